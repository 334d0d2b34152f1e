"""One multi-task training micro-batch, written once for every training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from torch import Tensor

from mtl_lightning.core.backend import StepBackend
from mtl_lightning.core.context import BalancingContext, MultiTaskModel


class Balancer(Protocol):
    """What the step asks of a balancing method (``mtl_lightning.balancing.BalancingMethod``)."""

    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]: ...

    def on_optimizer_step(self, ctx: BalancingContext) -> None: ...


@dataclass
class StepResult:
    """What one micro-batch did: the task losses, the weight the method gave each task, the
    regularization term R(θ) (or None), the batch size and whether the optimizer stepped."""

    losses: dict[str, Tensor]
    weights: dict[str, Tensor]
    regularization: Optional[Tensor]
    batch_size: int
    stepped: bool


class MultiTaskStep:
    """losses → balancing → gradients → optimizer step, for one micro-batch.

    The model computes the task losses (:meth:`MultiTaskModel.training_losses`); its λR(θ) term is
    backpropagated as is; the balancing method turns the losses into parameter gradients through a
    :class:`BalancingContext`; after the last micro-batch of an accumulation window the backend
    steps the optimizer and the method gets ``on_optimizer_step``.

    Args:
        model: The multi-task model.
        backend: The training loop's backward, DDP and optimizer.
        accumulate_grad_batches: Micro-batches per optimizer step.
    """

    def __init__(self, model: MultiTaskModel, backend: StepBackend, accumulate_grad_batches: int = 1) -> None:
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}.")
        self.model = model
        self.backend = backend
        self.accumulate_grad_batches = accumulate_grad_batches

    def context(self, batch: Any, forward: Any, global_step: int, epoch: int, is_last_microbatch: bool) -> BalancingContext:
        """The balancing context of a micro-batch whose forward pass is ``forward`` (TrainingLosses)."""
        return BalancingContext(
            losses=forward.losses, task_names=self.model.task_names, features=forward.features, batch=batch,
            global_step=global_step, epoch=epoch, is_last_microbatch=is_last_microbatch, model=self.model,
            backend=self.backend, accumulate_grad_batches=self.accumulate_grad_batches,
            head_inputs=forward.head_inputs, anchor=forward.anchor,
        )

    def __call__(self, batch: Any, balancer: Balancer, global_step: int = 0, epoch: int = 0,
                 is_last_microbatch: bool = True) -> StepResult:
        forward = self.model.training_losses(batch)
        ctx = self.context(batch, forward, global_step, epoch, is_last_microbatch)
        reg = self.model.regularization()
        if reg is not None:
            # R(θ) depends on parameters only: its gradient is the same on every rank, no sync needed.
            ctx.backward(reg, sync=False)
        weights = balancer.backward(ctx)
        if is_last_microbatch:
            self.backend.optimizer_step()
            balancer.on_optimizer_step(ctx)
        return StepResult(forward.losses, weights, reg, forward.batch_size, is_last_microbatch)
