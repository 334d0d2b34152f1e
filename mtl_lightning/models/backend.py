"""The Lightning side of :class:`~mtl_lightning.core.StepBackend`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Optional

import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

if TYPE_CHECKING:
    from mtl_lightning.models.module import MultiTaskModule


class LightningBackend:
    """Backward through ``manual_backward`` (precision plugin: AMP loss scaling), DDP no-sync
    through the strategy, the optimizer step through the ``LightningOptimizer`` (clipping runs in
    ``on_before_optimizer_step``, after unscaling) and per-step LR schedules."""

    def __init__(self, module: "MultiTaskModule") -> None:
        self.module = module

    @property
    def world_size(self) -> int:
        return self.module.trainer.world_size

    @property
    def global_rank(self) -> int:
        return self.module.trainer.global_rank

    def backward(self, loss: Tensor) -> None:
        self.module.manual_backward(loss)

    def no_sync(self) -> ContextManager[Any]:
        strategy = self.module.trainer.strategy
        if isinstance(strategy, ParallelStrategy):
            return strategy.block_backward_sync()
        return contextlib.nullcontext()

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        return self.module.reduce_mean(tensor)

    def loss_scale(self, device: torch.device) -> Optional[Tensor]:
        scaler = getattr(self.module.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        # scale() initialises the scaler's scale tensor lazily (needed by its unscale_ in step()).
        return scaler.scale(torch.ones((), device=device, dtype=torch.float32))

    def optimizer_step(self) -> None:
        module = self.module
        optimizer = module.optimizers()
        if isinstance(optimizer, list):
            raise RuntimeError(f"{type(module).__name__} steps one optimizer; configure_optimizers() returned {len(optimizer)}.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = module.lr_schedulers()
        if scheduler is not None and module.lr_scheduler_interval == "step":
            module.step_scheduler(scheduler)
