"""What a training loop provides to :class:`~mtl_lightning.core.MultiTaskStep`."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class StepBackend(Protocol):
    """The training loop as the step sees it.

    ``backward`` applies the loop's loss scaling (fp16 AMP) and is called inside ``no_sync()``
    when gradients must not be all-reduced yet; ``optimizer_step`` steps, clears the gradients and
    advances per-step schedules.
    """

    @property
    def world_size(self) -> int: ...

    @property
    def global_rank(self) -> int: ...

    def backward(self, loss: Tensor) -> None: ...

    def no_sync(self) -> ContextManager[Any]: ...

    def reduce_mean(self, tensor: Tensor) -> Tensor: ...

    def loss_scale(self, device: torch.device) -> Optional[Tensor]: ...

    def optimizer_step(self) -> None: ...


class TorchBackend:
    """A plain PyTorch loop: one optimizer, optional fp16 ``GradScaler``, gradient clipping and a
    ``DistributedDataParallel`` wrapper (whose ``no_sync`` is used), for scripts outside Lightning.

    Args:
        optimizer: The optimizer of the model's parameters.
        scaler: A ``torch.amp.GradScaler`` for fp16 loss scaling, or None.
        gradient_clip_val: Clip the (unscaled) gradients to this norm or value; None: no clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        ddp: The ``DistributedDataParallel`` wrapper of the model, or None on one process.
        scheduler: An LR scheduler stepped after every optimizer step, or None.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: Optional[torch.amp.GradScaler] = None,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: str = "norm",
        ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None,
        scheduler: Optional[Any] = None,
    ) -> None:
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}.")
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.ddp = ddp
        self.scheduler = scheduler
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self.global_rank = torch.distributed.get_rank() if distributed else 0

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def no_sync(self) -> ContextManager[Any]:
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        if self.world_size <= 1:
            return tensor
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size

    def loss_scale(self, device: torch.device) -> Optional[Tensor]:
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=device, dtype=torch.float32))

    def optimizer_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.gradient_clip_val:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.gradient_clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, self.gradient_clip_val)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
