"""The balancing contract.

A balancing method is a Lightning :class:`~lightning.pytorch.callbacks.Callback` configured under
``trainer.callbacks``. At every training micro-batch the :class:`~mtl_lightning.models.MultiTaskModule`
computes the per-task losses and hands them to the (single) balancing method in a
:class:`BalancingContext`; the method turns them into parameter gradients through the context and
returns the effective weight of each task (logged as ``train/<task>/weight``). After each optimizer
step the method gets :meth:`BalancingMethod.on_optimizer_step` (for post-step updates, e.g. FAMO).

Everything a method may touch goes through the context (``ctx.backward``, ``ctx.reduce_mean``,
``ctx.shared_parameters``…; defined in :mod:`mtl_lightning.core`), never through the module's attributes. Learnable weights are
registered with :meth:`BalancingContext`-independent :meth:`BalancingMethod.register_parameters`
during ``setup`` so that they live in the module: synchronised by DDP, saved in checkpoints, and
put in their own optimizer parameter group without weight decay.

Two families derive from :class:`BalancingMethod`:

* :class:`LossWeighting` — methods that need the losses only; they implement :meth:`LossWeighting.combine`.
* gradient methods (``mtl_lightning.gradients``) — methods that need per-task gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from mtl_lightning.core.context import BalancingContext

if TYPE_CHECKING:
    from mtl_lightning.models.module import MultiTaskModule


def shards_parameters(strategy: Any) -> bool:
    """Whether a Lightning strategy splits the model's parameters across processes (FSDP, DeepSpeed
    ZeRO, model parallelism) rather than replicating them (single device, DDP)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))


class BalancingMethod(Callback):
    """Base class of every task-balancing method.

    Subclasses implement :meth:`backward`. Set ``needs_all_tasks_per_step = True`` for methods that
    need every task's loss at every step (all gradient methods).
    """

    needs_all_tasks_per_step: ClassVar[bool] = False
    #: Extra options of the optimizer parameter group of this method's learnable parameters (a class
    #: default; an instance may set its own, e.g. from an ``lr`` argument).
    parameter_group_options: dict[str, Any] = {}
    #: Whether the method registry (:mod:`mtl_lightning.registry`) lists the class: False for a
    #: wrapper that is no method of its own (it needs an argument to be one, e.g. TorchJD's adapter).
    registered: ClassVar[bool] = True
    #: Whether the method takes gradients of the shared parameters itself (per task, or of one layer):
    #: it then needs every process to hold those parameters whole, which sharding strategies (FSDP,
    #: DeepSpeed, model parallelism) do not; :meth:`setup` refuses them with the alternative.
    needs_whole_parameters: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._module: Optional["MultiTaskModule"] = None

    # -- wiring -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from mtl_lightning.models.module import MultiTaskModule

        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError(
                f"{self.name} is a balancing callback for MultiTaskModule, got {type(pl_module).__name__}."
            )
        if self.needs_whole_parameters and shards_parameters(trainer.strategy):
            raise ValueError(
                f"{self.name} differentiates the shared parameters itself (per task, or for a look-ahead step), which "
                f"{type(trainer.strategy).__name__} shards across processes. Use --trainer.strategy ddp (for a "
                "large pretrained model, with per-task LoRA adapters: mtl_lightning.architectures.PerTaskLoRA, "
                "so that only the adapters are trained and differentiated per task), or a loss-weighting method."
            )
        self._module = pl_module
        self.attach(pl_module.task_names)

    def attach(self, task_names: list[str]) -> None:
        """Called once the tasks are known (before the strategy wraps the model). Register learnable
        parameters here with :meth:`register_parameters`; validate per-task options."""

    def register_parameters(self, parameters: Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """Give learnable weights to the module: DDP-synchronised, checkpointed, own param group.
        Returns the parameters the module holds (use those: after a second ``setup`` they are the
        already trained ones, not the fresh ones passed in)."""
        assert self._module is not None
        return self._module.register_balancing_parameters(self, parameters)

    def check_task_keys(self, option: str, mapping: Mapping[str, Any], task_names: list[str]) -> None:
        """Raise a clear error when a per-task option names tasks the model does not have."""
        unknown = sorted(set(mapping) - set(task_names))
        if unknown:
            raise ValueError(
                f"{self.name}: '{option}' names unknown task(s) {unknown}; the model's tasks are {task_names}."
            )

    # -- the contract -------------------------------------------------------------------------
    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]:
        """Turn ``ctx.losses`` into gradients (through ``ctx``); return each task's effective weight."""
        raise NotImplementedError

    def on_optimizer_step(self, ctx: BalancingContext) -> None:
        """Called right after each optimizer step, with the context of its last micro-batch."""


class LossWeighting(BalancingMethod):
    """A method that needs only the task losses: it combines them into one scalar objective."""

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (objective, effective weight of each task)."""
        raise NotImplementedError

    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]:
        objective, weights = self.combine(ctx.losses, ctx)
        ctx.backward(objective)
        return weights


def effective_weights(objective_fn: Callable[[Tensor], Tensor], losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """∂objective/∂L_t at the current losses: the effective weight of each task for a nonlinear
    combination (GLS, SI, STCH…), computed on detached copies."""
    names = list(losses)
    vec = torch.stack([losses[n].detach().float() for n in names]).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(objective_fn(vec), vec)
    return {n: grad[i] for i, n in enumerate(names)}


def require_positive_losses(method: str, losses: dict[str, Tensor], offsets: Optional[Mapping[str, float]] = None) -> None:
    """Raise a clear error when a method that takes the log of the losses (GLS, SI, STCH, FAMO)
    gets a loss ``L_t - offsets[t]`` that is not positive; such a log would silently become NaN."""
    offsets = offsets or {}
    values = torch.stack([l.detach().float() - offsets.get(n, 0.0) for n, l in losses.items()])
    if bool((values <= 0).any()):
        bad = {n: float(l) for (n, l), v in zip(losses.items(), values) if v <= 0}
        shift = " minus its min_loss" if offsets else ""
        raise ValueError(
            f"{method} takes the log of each task loss{shift}, which must be > 0; got {bad}. "
            "Use it with positive losses (cross-entropy, MSE…) or pick another balancing method."
        )


def task_positions(losses: Mapping[str, Tensor], task_names: list[str]) -> list[int]:
    """Position in ``task_names`` of each task in ``losses`` (in ``losses`` order), to index
    per-task state (learnable weights, histories) when only some tasks are present in a step."""
    return [task_names.index(name) for name in losses]
