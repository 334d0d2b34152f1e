"""Multi-dataset task mixing: one dataset per task, mixed into training steps by a policy.

A training batch is a *task-routed batch* ``{task_name: sub_batch}``: one entry per task trained at
that step (every task with :class:`~mtl_lightning.data.policies.AllTasks`, exactly one with a
one-task policy). Each ``sub_batch`` is that task's own batch (``{"input": …, <label_key>: …}``),
so tasks may differ in input shape and label type; the ``MultiTaskModule`` encodes each sub-batch
separately and routes it to its task's head. Validation and test batches use the same form, one
loader per task, so metrics are named by task (``val/<task>/<metric>``).

Sampling (``TaskMixingSampler``) is a pure function of (seed, epoch, position): every DDP rank draws
the same task sequence and the same per-task permutations, and takes its own slice of each step's
``batch_size × world_size`` block, so ranks train the same task at the same step on disjoint
samples. The data module saves (seed, epoch, position) in checkpoints, and a resumed run continues
the same sequence of tasks and samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset, loader_generator
from mtl_lightning.data.policies import AllTasks, MixingPolicy, resolve_policy

#: One training step for one rank: ``(task_name, sample indices)`` for every task trained at it.
StepPlan = tuple[tuple[str, Tensor], ...]


def fetch_batch(dataset: Dataset, indices: Union[Tensor, Sequence[int]]) -> Any:
    """The collated batch of ``dataset`` at ``indices`` (whole-batch ``__getitems__`` when available)."""
    if isinstance(dataset, TensorDictDataset):  # in-memory fast path: index with the tensor itself
        return dataset.__getitems__(indices)  # type: ignore[arg-type]
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if callable(getitems) else [dataset[i] for i in indices]
    return torch.utils.data.default_collate(items) if isinstance(items, list) else items


def _keep(batch: Any) -> Any:
    return batch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's draws, derived from (seed, epoch) alone: the same on every rank.

    The two numbers are combined and scrambled with the SplitMix64 finaliser, so that nearby
    (seed, epoch) pairs give unrelated streams.
    """
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return torch.Generator().manual_seed((z ^ (z >> 31)) >> 1)


class TaskMixingSampler(DistributedSampler):
    """Yields one :data:`StepPlan` per training step (for this rank).

    It shards by rank itself; being a ``DistributedSampler`` tells Lightning so (Lightning then
    neither wraps it nor replaces it), but none of ``DistributedSampler``'s own logic is used.

    Per epoch it draws, with :func:`epoch_generator`, the task of every step (from the policy) and a
    stream of shuffled passes over each task's dataset. A step that trains task t consumes the next
    ``batch_size × world_size`` indices of t's stream; rank r takes the r-th ``batch_size`` slice.
    Within a pass over t no index repeats on any rank; a pass that runs out continues into a freshly
    shuffled one (batches are always full).

    Lightning calls :meth:`set_epoch` at every epoch start (``epoch_source`` maps the epoch it passes
    to the one to draw: the data module's ``training_epoch``). ``consumed`` counts the steps of the
    current epoch that the trainer has taken (kept by the data module), so a resumed iterator
    starts where the checkpointed run stopped.

    Args:
        policy: A bound :class:`MixingPolicy`.
        sizes: Training samples per task (task order = the policy's).
        batch_size: Samples per task per step on each rank.
        seed: Seed of all draws.
        rank / world_size: This process's rank and the number of processes.
        steps_per_epoch: Epoch length; ``None``: the policy's default (see :meth:`default_steps`).
        epoch_source: Maps the epoch passed to :meth:`set_epoch` to the epoch drawn (default: itself).
    """

    def __init__(
        self,
        policy: MixingPolicy,
        sizes: Mapping[str, int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: Optional[int] = None,
        epoch_source: Optional[Callable[[int], int]] = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"TaskMixingSampler: rank {rank} is outside [0, {world_size}).")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or null, got {steps_per_epoch}.")
        if isinstance(policy, AllTasks) and steps_per_epoch is not None and policy.mode != "max_size_cycle":
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch} needs AllTasks(mode='max_size_cycle') (tasks cycle to fill "
                f"the epoch); mode {policy.mode!r} fixes the epoch length itself."
            )
        self.policy = policy
        self.task_names = list(sizes)
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch or self.default_steps()
        self.epoch = 0
        self.consumed = 0
        self.epoch_source = epoch_source

    @property
    def block(self) -> int:
        """Samples one step takes from a task across all ranks."""
        return self.batch_size * self.world_size

    def passes(self, task: str) -> int:
        """Steps of one full pass over ``task``'s data."""
        return -(-self.sizes[task] // self.block)

    def default_steps(self) -> int:
        """One-task policies: Σ_t steps of a pass over t (every sample once on average).
        AllTasks: the longest task's pass (``max_size_cycle``, ``max_size``) or the shortest (``min_size``)."""
        steps = [self.passes(t) for t in self.task_names]
        if isinstance(self.policy, AllTasks):
            return min(steps) if self.policy.mode == "min_size" else max(steps)
        return sum(steps)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if self.epoch_source is not None:
            epoch = self.epoch_source(epoch)
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def task_steps(self, epoch: int, generator: torch.Generator) -> list[list[int]]:
        """For each task (in order), the steps of ``epoch`` that train it."""
        steps, num_tasks = self.steps_per_epoch, len(self.task_names)
        if isinstance(self.policy, AllTasks):
            if self.policy.mode == "max_size":
                return [list(range(min(self.passes(t), steps))) for t in self.task_names]
            return [list(range(steps)) for _ in range(num_tasks)]
        sequence = self.policy.task_sequence(epoch * steps, steps, epoch, generator).tolist()
        out: list[list[int]] = [[] for _ in range(num_tasks)]
        for step, task in enumerate(sequence):
            out[task].append(step)
        return out

    def epoch_plan(self, epoch: int) -> list[StepPlan]:
        """This rank's plan of every step of ``epoch``."""
        generator = epoch_generator(self.seed, epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows: list[list[tuple[str, Tensor]]] = [[] for _ in range(self.steps_per_epoch)]
        for name, steps in zip(self.task_names, self.task_steps(epoch, generator)):
            if not steps:
                continue
            needed = len(steps) * self.block
            n = self.sizes[name]
            stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])
            blocks = stream[:needed].view(len(steps), self.block)[:, lo:hi]
            for step, block in zip(steps, blocks):
                rows[step].append((name, block))
        return [tuple(row) for row in rows]

    def __iter__(self) -> Iterator[StepPlan]:
        start = self.consumed
        yield from self.epoch_plan(self.epoch)[start:]


class MixedDataset(Dataset):
    """Maps a :data:`StepPlan` to the task-routed batch ``{task: sub_batch}``."""

    def __init__(self, datasets: Mapping[str, Dataset]) -> None:
        self.datasets = dict(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())  # type: ignore[arg-type, misc]  # Dataset declares no __len__

    def __getitem__(self, plan: StepPlan) -> dict[str, Any]:
        return {task: fetch_batch(self.datasets[task], indices) for task, indices in plan}


class TaskView(Dataset):
    """One task's dataset whose batches come task-routed: ``{task: sub_batch}`` (eval loaders)."""

    def __init__(self, task: str, dataset: Dataset) -> None:
        self.task, self.dataset = task, dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        return {self.task: fetch_batch(self.dataset, indices)}


class MultiDatasetDataModule(MultiTaskDataModule):
    """One dataset per task, mixed into training steps by ``policy``.

    Training batches are task-routed (``{task: sub_batch}``, see the module docstring); validation
    and test run one loader per task over that task's own data. ``tasks_per_step`` is the policy's
    (``"all"`` or ``"one"``): gradient balancing methods refuse ``"one"``.

    Under DDP the data module shards by rank itself (its training sampler is a
    ``DistributedSampler`` to Lightning, which therefore leaves it alone) and gives its evaluation
    loaders a non-shuffling ``DistributedSampler``.

    Args:
        policy: A :class:`~mtl_lightning.data.policies.MixingPolicy` (``class_path`` in YAML) or a
            shorthand: ``all``, ``uniform``, ``proportional``, ``temperature``, ``annealed``, ``round_robin``.
        datasets: ``{task: {"train": …, "val": …, "test": …}}``, map-style datasets whose samples are
            dicts with the input and the task's label; or override :meth:`build_datasets`.
        steps_per_epoch: Training steps per epoch; ``None``: the policy's default
            (:meth:`TaskMixingSampler.default_steps`).
        batch_size: Samples per task per step (per process under DDP).
        eval_batch_size, num_workers, seed: As in :class:`MultiTaskDataModule`.
    """

    def __init__(
        self,
        policy: Union[str, MixingPolicy] = "all",
        datasets: Optional[Mapping[str, Mapping[str, Dataset]]] = None,
        steps_per_epoch: Optional[int] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"{type(self).__name__}: steps_per_epoch must be >= 1 or null, got {steps_per_epoch}.")
        self.policy = resolve_policy(policy)
        self.steps_per_epoch = steps_per_epoch
        self._given_datasets = {task: dict(splits) for task, splits in (datasets or {}).items()}
        self.datasets: dict[str, dict[str, Dataset]] = {}  # type: ignore[assignment]
        self.sampler: Optional[TaskMixingSampler] = None
        self._progress = {"seed": seed, "epoch": 0, "position": 0}

    @property
    def batch_layout(self) -> str:  # type: ignore[override]
        return "routed"

    @property
    def tasks_per_step(self) -> str:  # type: ignore[override]
        return self.policy.tasks_per_step

    # ------------------------------------------------------------------ datasets
    def build_datasets(self) -> dict[str, dict[str, Dataset]]:  # type: ignore[override]
        """Return ``{task: {"train": …, "val": …, "test": …}}``; by default the ``datasets`` argument."""
        if not self._given_datasets:
            raise ValueError(f"{type(self).__name__}: pass 'datasets' ({{task: {{split: dataset}}}}) or override build_datasets().")
        return self._given_datasets

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            datasets = self.build_datasets()
            for task, splits in datasets.items():
                if "train" not in splits:
                    raise ValueError(f"{type(self).__name__}: task '{task}' has no 'train' dataset (splits: {sorted(splits)}).")
            self.datasets = datasets

    @property
    def task_names(self) -> list[str]:
        self.setup()
        return list(self.datasets)

    def split_datasets(self, task: str) -> dict[str, Dataset]:
        """``task``'s own datasets by split (empty when it has none)."""
        self.setup()
        return dict(self.datasets.get(task, {}))

    @property
    def label_keys_by_task(self) -> dict[str, set[str]]:
        """The label keys each task's training data provides (checked against the tasks by the module)."""
        self.setup()
        out = {}
        for task, splits in self.datasets.items():
            dataset = splits["train"]
            keys = getattr(dataset, "keys", None)
            out[task] = set(keys if keys is not None else dataset[0]) - {self.input_key}
        return out

    @property
    def label_keys(self) -> set[str]:
        return set().union(*self.label_keys_by_task.values())

    # ------------------------------------------------------------------ loaders
    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def make_sampler(self) -> TaskMixingSampler:
        """The training sampler for this process, bound to the tasks and positioned at the saved progress."""
        self.setup()
        trainer = self._trainer_or_none()
        max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        sizes = {task: len(splits["train"]) for task, splits in self.datasets.items()}  # type: ignore[arg-type]
        self.policy.bind(sizes, max_epochs)
        progress = self.state_dict()  # a reloaded loader continues where the previous one was
        sampler = TaskMixingSampler(
            self.policy,
            sizes,
            self.batch_size,
            seed=progress["seed"],
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            steps_per_epoch=self.steps_per_epoch,
            epoch_source=self.training_epoch,
        )
        sampler.epoch, sampler.consumed = progress["epoch"], progress["position"]
        return sampler

    def train_dataloader(self) -> DataLoader:
        self.sampler = self.make_sampler()
        dataset = MixedDataset({task: splits["train"] for task, splits in self.datasets.items()})
        return DataLoader(
            dataset,
            sampler=self.sampler,
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=loader_generator(self.seed),
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        self.setup()
        trainer = self._trainer_or_none()
        distributed = trainer is not None and trainer.world_size > 1
        loaders = []
        for task, splits in self.datasets.items():
            if split not in splits:
                continue
            view = TaskView(task, splits[split])
            sampler: Sampler = (
                DistributedSampler(view, trainer.world_size, trainer.global_rank, shuffle=False)
                if distributed
                else SequentialSampler(view)
            )
            loaders.append(
                DataLoader(view, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=_keep, num_workers=self.num_workers,
                           generator=loader_generator(self.seed))
            )
        if not loaders:
            raise KeyError(f"{type(self).__name__}: no task has a '{split}' dataset.")
        return loaders

    def val_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return self._eval_loaders("predict" if any("predict" in s for s in self.datasets.values()) else "test")

    # ------------------------------------------------------------------ progress and checkpoints
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch the training loop actually consumes (unlike the sampler, which
        # the prefetching loader runs ahead): the resumable position.
        trainer = self._trainer_or_none()
        if self.sampler is not None and trainer is not None and trainer.training:
            self.sampler.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Sampler state: the seed and epoch from which the generator is derived, and the position."""
        if self.sampler is not None:
            return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "position": self.sampler.consumed}
        return dict(self._progress)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = sorted({"seed", "epoch", "position"} - set(state_dict))
        if missing:
            raise KeyError(f"{type(self).__name__}: checkpoint state lacks {missing} (has {sorted(state_dict)}).")
        self._progress = {k: int(state_dict[k]) for k in ("seed", "epoch", "position")}
        if self.sampler is not None:
            self.sampler.seed = self._progress["seed"]
            self.sampler.epoch, self.sampler.consumed = self._progress["epoch"], self._progress["position"]
