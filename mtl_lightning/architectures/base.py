"""The architecture protocol: which parameters the tasks share, and how each task reads them.

Every consumer of "shared" (the per-task gradient engine, rep mode, GradNorm's last shared layer,
the negative-transfer monitor, ``init_from`` and the optimizer's parameter groups) asks the model's
:class:`Architecture`, never the module tree. Roles follow the flow of gradients:

* **shared**: every task's loss reaches the parameter. Gradient methods arbitrate these (the
  Jacobian of param mode is taken w.r.t. them).
* **task-own** (per task, besides the head): only that task's loss reaches it (MTAN's attention
  modules, MMoE's gates, a task's tower). Like heads, it gets its task's unweighted gradient.
* **mixing**: parameters that route information between tasks (cross-stitch units, gates of a
  shared branch, task-graph attention). They get the unweighted sum of the task gradients under
  gradient methods: they decide how much the tasks share, which a conflict-resolving direction on
  the shared parameters should not decide for them.

Under loss weighting every parameter simply receives ∇ Σ_t w_t L_t.

An architecture with a single **shared representation** z (the output of the shared parameters
that every task reads; first dimension the batch) implements :meth:`Architecture.represent` and
:meth:`Architecture.read` and lists ``"rep"`` in ``supported_modes``: rep mode and the one-backward
engine path use z. Others implement :meth:`Architecture.forward` (features by task) only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


@dataclass
class ParameterRoles:
    """The roles of an architecture's parameters (by identity; heads are the module's business)."""

    shared: list[nn.Parameter] = field(default_factory=list)
    task_own: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    mixing: list[nn.Parameter] = field(default_factory=list)


class Architecture(nn.Module):
    """Base class of multi-task architectures (the ``model.encoder`` of :class:`MultiTaskModule`).

    A subclass builds its per-task parts in :meth:`build` (the model calls :meth:`bind` with its task
    names: they are never repeated in the config), declares :meth:`parameter_roles`, and computes
    features either through :meth:`represent` + :meth:`read` (a shared representation exists) or
    :meth:`forward` (features by task). ``out_features`` is the width of each task's features (the
    default heads are built for it). ``regularization()`` may return a λR(θ) term that depends on
    parameters only (soft sharing).
    """

    #: Gradient-method modes the architecture supports (``"rep"`` needs a shared representation).
    supported_modes: ClassVar[tuple[str, ...]] = ("param",)
    #: True where each task's features come from its own forward pass through the shared parameters
    #: (per-task adapters over one backbone): the T per-task backward passes share no work, and one
    #: vmapped backward of T rows would traverse all T passes for every row (T² work), so the gradient
    #: engine loops over the tasks instead.
    separate_task_passes: ClassVar[bool] = False
    out_features: Optional[int] = None

    def __init__(self) -> None:
        super().__init__()
        self._task_names: Optional[list[str]] = None

    # -- binding -----------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        if self._task_names is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to tasks yet; MultiTaskModule binds it.")
        return list(self._task_names)

    def bind(self, task_names: Sequence[str]) -> None:
        """Attach the model's tasks (once) and build the per-task parts."""
        names = list(task_names)
        if self._task_names is not None:
            if names != self._task_names:
                raise ValueError(
                    f"{type(self).__name__} is already bound to tasks {self._task_names}; cannot rebind to {names}."
                )
            return
        self._task_names = names
        self.build(names)

    def build(self, task_names: list[str]) -> None:
        """Create the per-task modules for ``task_names`` (default: none)."""

    # -- the protocol --------------------------------------------------------------------------------
    def parameter_roles(self) -> ParameterRoles:
        """Shared, task-own and mixing parameters; together exactly this module's parameters."""
        raise NotImplementedError

    @property
    def has_representation(self) -> bool:
        return "rep" in self.supported_modes

    def represent(self, x: Tensor) -> Tensor:
        """The shared representation z (batch first), computed by the shared parameters only."""
        raise NotImplementedError(f"{type(self).__name__} has no shared representation (modes: {list(self.supported_modes)}).")

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        """Task ``task``'s features from z (and the input ``x``, e.g. for gates); uses no shared parameter."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Features by task."""
        z = self.represent(x)
        return {name: self.read(z, x, name) for name in self.task_names}

    def last_shared_layer(self) -> list[nn.Parameter]:
        """GradNorm's W: the parameters of the module holding the last shared parameter."""
        shared = {id(p) for p in self.parameter_roles().shared}
        owner: Optional[nn.Module] = None
        for module in self.modules():
            if any(id(p) in shared for p in module.parameters(recurse=False)):
                owner = module
        return [] if owner is None else [p for p in owner.parameters(recurse=False) if id(p) in shared]

    def regularization(self) -> Optional[Tensor]:
        """λR(θ), a function of the parameters only (added once per micro-batch), or None."""
        return None

    def statistics(self) -> dict[str, Tensor]:
        """Quantities accumulated over training steps since the last call (sums and a ``count``),
        which the model averages over ranks and logs each epoch (e.g. a task-graph adjacency)."""
        return {}


# -- helpers for architectures ------------------------------------------------------------------------
def replicate(module: nn.Module, count: int) -> nn.ModuleList:
    """``count`` independent copies of ``module``: the first keeps its weights, the others are
    re-initialised (``reset_parameters``), as experts and towers must not start identical."""
    copies = nn.ModuleList(copy.deepcopy(module) for _ in range(count))
    for replica in list(copies)[1:]:
        for sub in replica.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return copies


def parameters_of(*modules: Any) -> list[nn.Parameter]:
    """The parameters of ``modules`` (modules, or iterables of modules / parameters), in order."""
    out: list[nn.Parameter] = []
    for item in modules:
        if isinstance(item, nn.Parameter):
            out.append(item)
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
        elif isinstance(item, Iterable):
            out.extend(parameters_of(*item))
    return out


def output_width(module: nn.Module, name: str, owner: str) -> int:
    """``module.out_features`` as an int, or a clear error naming the architecture's argument."""
    width = getattr(module, "out_features", None)
    if not isinstance(width, int):
        raise ValueError(f"{owner}: '{name}' ({type(module).__name__}) needs an integer 'out_features'.")
    return width


def softmax_gate(in_features: int, count: int) -> nn.Module:
    """A linear gate over ``count`` choices reading the flattened input (MMoE, CGC, PLE)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, count), nn.Softmax(dim=-1))


def mix(weights: Tensor, stacked: Tensor) -> Tensor:
    """Σ_e weights[b, e] · stacked[b, e, ...]: a gate's mixture of expert outputs."""
    return torch.einsum("be,be...->b...", weights.to(stacked.dtype), stacked)
