"""Task-mixing policies: which task(s) a training step draws its batch from.

Proportional and temperature sampling follow Arivazhagan et al. (2019, arXiv 1907.05019) and
T5 (Raffel et al., JMLR 2020); annealed sampling follows Stickland & Murray (ICML 2019); the
all-tasks modes are Lightning's ``CombinedLoader`` modes.

Two kinds:

* :class:`AllTasks` — one batch of *every* task at every step (``tasks_per_step = "all"``), with the
  epoch length of Lightning's ``CombinedLoader`` modes. The only kind gradient methods may use.
* one task per step (``tasks_per_step = "one"``) — :class:`Uniform`, :class:`Proportional`,
  :class:`Temperature`, :class:`Annealed`, :class:`RoundRobin`, :class:`Explicit`, :class:`Scheduled`.

A policy is bound to the task sizes by the data module (:meth:`MixingPolicy.bind`) and then turns a
range of steps into a task sequence with a generator that every DDP rank seeds identically, so all
ranks train the same task at the same step. ``step`` counts training batches from the start of
training (``epoch * steps_per_epoch + position``).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

#: Combined-loader modes of :class:`AllTasks` (same names and epoch lengths as Lightning's).
ALL_TASKS_MODES = ("max_size_cycle", "min_size", "max_size")


class MixingPolicy:
    """Base class. Subclasses are one-task policies unless they set ``tasks_per_step = "all"``."""

    tasks_per_step: ClassVar[str] = "one"
    #: Name usable as the string shorthand ``policy: <name>`` in YAML.
    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    @property
    def task_names(self) -> list[str]:
        return list(self.sizes)

    def bind(self, sizes: Mapping[str, int], num_epochs: Optional[int] = None) -> None:
        """Learn the tasks and their training-set sizes (and the run's epochs); validate options."""
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"{type(self).__name__}: every task needs at least one training sample; empty: {bad}.")
        self.sizes = dict(sizes)

    def task_sequence(self, first_step: int, num_steps: int, epoch: int, generator: torch.Generator) -> Tensor:
        """Task index (into ``task_names``) of each of ``num_steps`` steps starting at ``first_step``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AllTasks(MixingPolicy):
    """One batch of every task at every step.

    Args:
        mode: Epoch length, as Lightning's ``CombinedLoader``: ``max_size_cycle`` (the longest task's
            batches; shorter tasks cycle, reshuffled), ``min_size`` (the shortest task's batches) or
            ``max_size`` (the longest task's; a task whose data is exhausted is absent from later steps).
    """

    tasks_per_step = "all"
    name = "all"

    def __init__(self, mode: str = "max_size_cycle") -> None:
        super().__init__()
        if mode not in ALL_TASKS_MODES:
            raise ValueError(f"AllTasks: mode must be one of {list(ALL_TASKS_MODES)}, got {mode!r}.")
        self.mode = mode

    def __repr__(self) -> str:
        return f"AllTasks(mode={self.mode!r})"


class OneTaskPolicy(MixingPolicy):
    """A one-task-per-step policy that draws the task from per-step probabilities."""

    #: True when the probabilities do not change within an epoch (one vectorised draw per epoch).
    constant_within_epoch: ClassVar[bool] = True

    def probabilities(self, step: int, epoch: int) -> Tensor:
        """(T,) task probabilities at ``step`` (0-based) of ``epoch`` (0-based)."""
        raise NotImplementedError

    def task_sequence(self, first_step: int, num_steps: int, epoch: int, generator: torch.Generator) -> Tensor:
        if num_steps == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.constant_within_epoch:
            return torch.multinomial(self.probabilities(first_step, epoch), num_steps, replacement=True, generator=generator)
        rows = torch.stack([self.probabilities(first_step + i, epoch) for i in range(num_steps)])
        return torch.multinomial(rows, 1, replacement=True, generator=generator).squeeze(1)

    def _sizes(self) -> Tensor:
        return torch.tensor([self.sizes[n] for n in self.task_names], dtype=torch.float64)


def _normalised(weights: Tensor) -> Tensor:
    return (weights / weights.sum()).float()


class Uniform(OneTaskPolicy):
    """p_i = 1/T."""

    name = "uniform"

    def probabilities(self, step: int, epoch: int) -> Tensor:
        return torch.full((len(self.sizes),), 1.0 / len(self.sizes))


class Proportional(OneTaskPolicy):
    """p_i ∝ min(n_i, K): examples-proportional mixing with an optional cap K (T5, arXiv 1910.10683).

    Args:
        cap: K, the size above which a dataset counts as K examples; ``None``: no cap.
    """

    name = "proportional"

    def __init__(self, cap: Optional[int] = None) -> None:
        super().__init__()
        if cap is not None and cap < 1:
            raise ValueError(f"Proportional: cap must be a positive number of examples or null, got {cap}.")
        self.cap = cap

    def probabilities(self, step: int, epoch: int) -> Tensor:
        sizes = self._sizes()
        return _normalised(sizes if self.cap is None else sizes.clamp(max=self.cap))

    def __repr__(self) -> str:
        return f"Proportional(cap={self.cap})"


class Temperature(OneTaskPolicy):
    """p_i ∝ n_i^{1/τ} (τ = 1: proportional, τ → ∞: uniform; mT5 and XLM-R use 1/τ = 0.3).

    Args:
        temperature: τ > 0.
    """

    name = "temperature"

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"Temperature: temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def probabilities(self, step: int, epoch: int) -> Tensor:
        return _normalised(self._sizes() ** (1.0 / self.temperature))

    def __repr__(self) -> str:
        return f"Temperature(temperature={self.temperature})"


class Annealed(OneTaskPolicy):
    """Annealed sampling (Stickland & Murray 2019, arXiv 1902.02671): p_i ∝ n_i^α with
    α = 1 − 0.8 (e − 1)/(E − 1), e = 1…E the epoch: proportional first, nearly uniform last.

    Args:
        num_epochs: E; ``None`` takes the Trainer's ``max_epochs``.
    """

    name = "annealed"

    def __init__(self, num_epochs: Optional[int] = None) -> None:
        super().__init__()
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"Annealed: num_epochs must be >= 1, got {num_epochs}.")
        self.num_epochs = num_epochs
        self._epochs: Optional[int] = num_epochs

    def bind(self, sizes: Mapping[str, int], num_epochs: Optional[int] = None) -> None:
        super().bind(sizes, num_epochs)
        self._epochs = self.num_epochs or (num_epochs if num_epochs is not None and num_epochs > 0 else None)
        if self._epochs is None:
            raise ValueError(
                "Annealed: the schedule needs the number of epochs E; set the policy's num_epochs "
                "or the Trainer's max_epochs."
            )

    def alpha(self, epoch: int) -> float:
        """α at the 0-based ``epoch`` (held at its final value after epoch E)."""
        if self._epochs is None:
            raise RuntimeError("Annealed: call bind() before alpha().")
        if self._epochs == 1:
            return 1.0
        e = min(epoch + 1, self._epochs)
        return 1.0 - 0.8 * (e - 1) / (self._epochs - 1)

    def probabilities(self, step: int, epoch: int) -> Tensor:
        return _normalised(self._sizes() ** self.alpha(epoch))

    def __repr__(self) -> str:
        return f"Annealed(num_epochs={self.num_epochs})"


class RoundRobin(MixingPolicy):
    """Task k = step mod T, in task order: every task equally often, deterministically."""

    name = "round_robin"

    def task_sequence(self, first_step: int, num_steps: int, epoch: int, generator: torch.Generator) -> Tensor:
        return torch.arange(first_step, first_step + num_steps) % len(self.sizes)


def _check_weights(owner: str, weights: Mapping[str, float], task_names: list[str], where: str) -> Tensor:
    """Validated (T,) probabilities from per-task weights (every task listed, ≥ 0, positive sum)."""
    unknown = sorted(set(weights) - set(task_names))
    if unknown:
        raise ValueError(f"{owner}: {where} names unknown task(s) {unknown}; the tasks are {task_names}.")
    missing = [n for n in task_names if n not in weights]
    if missing:
        raise ValueError(f"{owner}: {where} gives no probability for task(s) {missing}; list every task (0 allowed).")
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"{owner}: {where} has negative or non-finite value(s) {bad}.")
    values = torch.tensor([float(weights[n]) for n in task_names], dtype=torch.float64)
    if values.sum() <= 0:
        raise ValueError(f"{owner}: {where} are all zero; at least one task needs a positive probability.")
    return _normalised(values)


class Explicit(OneTaskPolicy):
    """Fixed per-task probabilities given by the user (normalised to sum to 1).

    Args:
        probabilities: ``{task: p}`` for every task, p ≥ 0.
    """

    name = "explicit"

    def __init__(self, probabilities: dict[str, float]) -> None:
        super().__init__()
        self.weights = dict(probabilities)
        self._probs: Optional[Tensor] = None

    def bind(self, sizes: Mapping[str, int], num_epochs: Optional[int] = None) -> None:
        super().bind(sizes, num_epochs)
        self._probs = _check_weights("Explicit", self.weights, self.task_names, "'probabilities'")

    def probabilities(self, step: int, epoch: int) -> Tensor:
        assert self._probs is not None, "Explicit: call bind() first."
        return self._probs

    def __repr__(self) -> str:
        return f"Explicit(probabilities={self.weights})"


ScheduleFn = Callable[[int], Union[str, Mapping[str, float]]]


def import_object(path: str) -> object:
    """The object at the dotted path ``package.module.name``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not a dotted path 'package.module.function'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} of {path!r}: {err}.") from err
    if not hasattr(module, attr):
        raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (from {path!r}).")
    return getattr(module, attr)


class Scheduled(OneTaskPolicy):
    """A user-supplied schedule: ``schedule(step)`` returns the task name to train at ``step`` or a
    ``{task: probability}`` mapping to draw it from (every task listed, normalised).

    Args:
        schedule: The function, or its dotted import path (``mypackage.schedules.warmup``) in YAML.
    """

    name = "scheduled"
    constant_within_epoch = False

    def __init__(self, schedule: Union[str, ScheduleFn]) -> None:
        super().__init__()
        self.schedule_path = schedule if isinstance(schedule, str) else None
        fn = import_object(schedule) if isinstance(schedule, str) else schedule
        if not callable(fn):
            raise ValueError(f"Scheduled: schedule {schedule!r} is not callable.")
        self.schedule: ScheduleFn = fn

    def probabilities(self, step: int, epoch: int) -> Tensor:
        value = self.schedule(step)
        if isinstance(value, str):
            if value not in self.sizes:
                raise ValueError(f"Scheduled: schedule({step}) returned unknown task {value!r}; the tasks are {self.task_names}.")
            return torch.nn.functional.one_hot(torch.tensor(self.task_names.index(value)), len(self.sizes)).float()
        if not isinstance(value, Mapping):
            raise ValueError(
                f"Scheduled: schedule({step}) returned {type(value).__name__}; it must return a task name "
                "or a {task: probability} mapping."
            )
        return _check_weights("Scheduled", value, self.task_names, f"schedule({step})")

    def __repr__(self) -> str:
        return f"Scheduled(schedule={self.schedule_path or self.schedule!r})"


#: String shorthands for policies without required arguments.
POLICIES: dict[str, type[MixingPolicy]] = {
    cls.name: cls for cls in (AllTasks, Uniform, Proportional, Temperature, Annealed, RoundRobin)
}


def resolve_policy(policy: Union[str, MixingPolicy]) -> MixingPolicy:
    """A policy instance from an instance or a shorthand name (``"temperature"``, ``"all"``…)."""
    if isinstance(policy, MixingPolicy):
        return policy
    if isinstance(policy, str):
        if policy in POLICIES:
            return POLICIES[policy]()
        if policy in (Explicit.name, Scheduled.name):
            raise ValueError(
                f"Policy {policy!r} needs arguments; give it as class_path "
                f"mtl_lightning.data.policies.{policy.capitalize()} with init_args."
            )
        raise ValueError(f"Unknown mixing policy {policy!r}; choose from {sorted(POLICIES)} or give a class_path.")
    raise TypeError(f"policy must be a MixingPolicy or a name, got {type(policy).__name__}.")
