"""What a balancing method sees at one training micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from mtl_lightning.core.backend import StepBackend


class MultiTaskModel(Protocol):
    """The model as the step and the balancing methods see it (``MultiTaskModule`` is one)."""

    @property
    def task_names(self) -> list[str]: ...

    @property
    def architecture(self) -> Any: ...

    def compute_losses(
        self, batch: Any, stage: str = "train", head_inputs: Optional[dict[str, Tensor]] = None
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]: ...

    def training_losses(self, batch: Any) -> "TrainingLosses": ...

    def regularization(self) -> Optional[Tensor]: ...

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def named_shared_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    def task_parameters(self, task: str) -> list[nn.Parameter]: ...

    def unshared_parameters(self) -> list[nn.Parameter]: ...


@dataclass
class TrainingLosses:
    """A micro-batch's forward pass, as the step needs it.

    Attributes:
        features: The shared representation z (features by task where the architecture has none).
        losses: Mean loss of each task with a labelled sample, in task order.
        head_inputs: By task, the alias of ``features`` its head read, or None.
        anchor: A zero that depends on the outputs of the tasks without a loss, added to every
            backward so that DDP sees a (zero) gradient for every head; None when all have a loss.
        batch_size: Samples in the micro-batch (all sub-batches of a task-routed batch).
    """

    features: Any
    losses: dict[str, Tensor]
    head_inputs: Optional[dict[str, Tensor]] = None
    anchor: Optional[Tensor] = None
    batch_size: int = 0


@dataclass
class BalancingContext:
    """What a balancing method sees at one training micro-batch.

    Everything a method may touch goes through the context (``ctx.backward``, ``ctx.reduce_mean``,
    ``ctx.shared_parameters``…), never through the model's or the loop's attributes.

    Attributes:
        losses: Mean loss of each task present in the micro-batch (differentiable), in task order.
            A task with no labelled sample in the micro-batch is absent.
        task_names: All task names of the model, in order.
        features: The shared representation z (or, where the architecture has none, features by task).
        batch: The micro-batch itself (methods that re-evaluate the losses after a step use it).
        global_step: Optimizer steps taken so far.
        epoch: Current epoch.
        is_last_microbatch: True when the optimizer steps after this micro-batch.
        model: The multi-task model (parameter roles, loss computation).
        backend: The training loop (backward, DDP, loss scaling).
        accumulate_grad_batches: Micro-batches per optimizer step (gradients written directly must
            be divided by it).
        head_inputs: By task, the alias of ``features`` its path read (see
            ``MultiTaskModule.encode``), or None (task-routed batches, frozen encoder).
        anchor: See :class:`TrainingLosses`.
    """

    losses: dict[str, Tensor]
    task_names: list[str]
    features: Any
    batch: Mapping[str, Any]
    global_step: int
    epoch: int
    is_last_microbatch: bool
    model: MultiTaskModel = field(repr=False)
    backend: StepBackend = field(repr=False)
    accumulate_grad_batches: int = 1
    head_inputs: Optional[Mapping[str, Tensor]] = None
    anchor: Optional[Tensor] = field(default=None, repr=False)

    # -- gradients ----------------------------------------------------------------------------
    def backward(self, loss: Tensor, sync: Optional[bool] = None) -> None:
        """Backpropagate ``loss`` into ``.grad``: divided by the accumulation count, loss-scaled
        under fp16, DDP-synchronised only at the last micro-batch (or as ``sync`` says)."""
        if self.anchor is not None:
            loss = loss + self.anchor
        if self.accumulate_grad_batches > 1:
            loss = loss / self.accumulate_grad_batches
        if self.is_last_microbatch if sync is None else sync:
            self.backend.backward(loss)
        else:
            with self.backend.no_sync():
                self.backend.backward(loss)

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.model.shared_parameters()

    def named_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the shared parameters, names relative to the encoder (e.g. to
        pick the last shared layer, as GradNorm does)."""
        return self.model.named_shared_parameters()

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters only ``task`` trains: its head and its own architecture parts."""
        return self.model.task_parameters(task)

    def unshared_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter that is not shared by all tasks (heads, task-own, mixing)."""
        return self.model.unshared_parameters()

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The architecture's last shared layer (GradNorm's W), trainable parameters only."""
        return [p for p in self.model.architecture.last_shared_layer() if p.requires_grad]

    @property
    def architecture(self) -> Any:
        """The model's architecture (to check supported modes and name it in errors)."""
        return self.model.architecture

    def recompute_losses(self) -> dict[str, Tensor]:
        """The task losses on this micro-batch with the current parameters, without gradient."""
        with torch.no_grad():
            return self.model.compute_losses(self.batch)[2]

    @property
    def loss_scale(self) -> Optional[Tensor]:
        """The fp16 GradScaler's current scale S as a device tensor, or None without loss scaling.

        Gradients written directly into ``.grad`` must be in scaled space (×S) so that the optimizer
        step's unscale and inf/NaN skip still work.
        """
        ref = next(iter(self.losses.values()))
        return self.backend.loss_scale(ref.device)

    def no_sync(self) -> Any:
        """Context manager that keeps DDP from all-reducing gradients during backward passes."""
        return self.backend.no_sync()

    # -- distributed --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.backend.world_size

    @property
    def global_rank(self) -> int:
        return self.backend.global_rank

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over all DDP ranks (identity on one process)."""
        return self.backend.reduce_mean(tensor)

    def loss_vector(self, losses: Optional[Mapping[str, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Detached losses of all tasks as a (T,) vector averaged over ranks, and a presence mask.

        Tasks absent on every rank get NaN. The result is identical on every rank, so history-based
        state built from it (DWA, STCH, FAMO…) stays in sync and checkpoints from rank 0 are right.
        """
        losses = self.losses if losses is None else losses
        ref = next(iter(losses.values())) if losses else torch.zeros(())
        values = torch.zeros(len(self.task_names), device=ref.device, dtype=torch.float32)
        counts = torch.zeros_like(values)
        for i, name in enumerate(self.task_names):
            if name in losses:
                values[i] = losses[name].detach().float()
                counts[i] = 1.0
        summed = self.reduce_mean(torch.stack([values, counts])) * self.world_size
        present = summed[1] > 0
        mean = torch.where(present, summed[0] / summed[1].clamp_min(1), torch.full_like(values, float("nan")))
        return mean, present
