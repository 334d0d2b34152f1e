"""Data modules for datasets in which one sample carries labels for several tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

if TYPE_CHECKING:
    from mtl_lightning.data.held_out import HeldOutBatches


def _take(value: Any, index: Any) -> Any:
    return {k: v[index] for k, v in value.items()} if isinstance(value, Mapping) else value[index]


def _length(value: Any) -> int:
    if isinstance(value, Mapping):
        lengths = {len(v) for v in value.values()}
        if len(lengths) != 1:
            raise ValueError(f"TensorDictDataset: the tensors of a dict entry need one length, got {sorted(lengths)}.")
        return lengths.pop()
    return len(value)


class TensorDictDataset(Dataset):
    """In-memory dataset of equally long tensors by key; a sample is ``{key: tensor[i]}``.

    A value may itself be a dict of tensors (a tokenized text input ``{"input_ids": …,
    "attention_mask": …}``); a sample then holds that dict's rows.

    It fetches whole batches at once (``__getitems__``), which makes loading small in-memory
    benchmarks an order of magnitude cheaper than per-sample collation.
    """

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        lengths = {k: _length(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TensorDictDataset: all tensors need the same length, got {lengths}.")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: _take(v, index) for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: _take(v, idx) for k, v in self.tensors.items()}

    @property
    def keys(self) -> set[str]:
        return set(self.tensors)

    def label_tensor(self, key: str) -> Optional[Tensor]:
        """The whole tensor under ``key`` (for the set-up checks of the labels), or None."""
        value = self.tensors.get(key)
        return value if isinstance(value, Tensor) else None


def dataset_labels(dataset: Dataset, key: str) -> Optional[Tensor]:
    """Every label ``key`` of ``dataset`` as one tensor, when the dataset holds them in memory: it
    defines ``label_tensor(key)`` (:class:`TensorDictDataset` does), or is a ``Subset`` of one.
    None otherwise: a dataset that cannot expose its labels cheaply is not iterated."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset, key)
        return None if labels is None else labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    getter = getattr(dataset, "label_tensor", None)
    labels = getter(key) if callable(getter) else None
    return labels if isinstance(labels, Tensor) else None


def _batch_length(batch: Any) -> int:
    for value in (batch.values() if isinstance(batch, Mapping) else [batch]):
        if isinstance(value, Tensor):
            return len(value)
    return 0


def collate_batched(batch: Any) -> Any:
    """Collate for datasets that already return whole batches (``__getitems__``)."""
    if isinstance(batch, Mapping):
        return batch
    return torch.utils.data.default_collate(batch)


def loader_generator(seed: int) -> torch.Generator:
    """The generator a ``DataLoader`` draws its workers' base seed from, once per iterator. Without one
    it draws from the global RNG, where a resumed run (which starts an iterator mid-epoch) would take
    a number an uninterrupted run leaves to the model (dropout): the global RNG is checkpointed by the
    module, and loaders leave it alone."""
    return torch.Generator().manual_seed(seed)


class EpochShuffleSampler(DistributedSampler):
    """The training order: a permutation drawn from ``seed + epoch`` (``DistributedSampler``'s rule,
    so every rank agrees and each takes its shard), starting ``skip`` samples into this rank's share.

    Nothing comes from the global RNG, so a run resumed from a checkpoint (epoch and position, kept
    by the data module) draws the same batches as an uninterrupted one. Lightning sees a
    ``DistributedSampler`` and neither wraps nor replaces it. ``epoch_source`` maps the epoch
    Lightning passes to :meth:`set_epoch` to the one to draw (the data module's
    :meth:`~MultiTaskDataModule.training_epoch`).

    A dataset whose samples are random per epoch (augmentation) sets ``epoch_keyed = True``: it is
    then indexed by ``(epoch, index)`` and seeds its draws from them, so they too are the same in a
    resumed run and in any worker.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 epoch_source: Optional[Callable[[int], int]] = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0
        self.epoch_source = epoch_source
        self.epoch_keyed = bool(getattr(dataset, "epoch_keyed", False))

    def __iter__(self) -> Any:
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices] if self.epoch_keyed else indices)

    # __len__ stays the full share: Lightning reads it once per fit, for every epoch.

    def set_epoch(self, epoch: int) -> None:
        if self.epoch_source is not None:
            epoch = self.epoch_source(epoch)
        if epoch != self.epoch:
            self.skip = 0  # a new epoch starts at its beginning; a resumed one keeps its position
        super().set_epoch(epoch)


class MultiTaskDataModule(pl.LightningDataModule):
    """Base data module: one dataset per split, each sample a dict with the input and every task's label.

    Subclasses implement :meth:`build_datasets`. ``label_keys`` lists the labels the data provides, so
    that a task configured for a label that does not exist is reported before training starts.
    All tasks are present in every step (``tasks_per_step = "all"``).

    Args:
        batch_size: Training batch size (per process under DDP).
        eval_batch_size: Validation/test batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: Seed of the data generation and splits.
    """

    tasks_per_step = "all"
    #: How a training batch is laid out: ``"shared"`` (one dict, every task's label beside the
    #: input) or ``"routed"`` (``{task: sub_batch}``, one dataset per task). The model reads it.
    batch_layout: str = "shared"
    #: Key of the model input in every batch (and sub-batch); the model's ``input_key`` must match.
    input_key: str = "input"

    def __init__(self, batch_size: int = 128, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.datasets: Mapping[str, Dataset] = {}
        #: The training sampler (a subclass may use another ``DistributedSampler``, see ``mixing``).
        self.sampler: Optional[DistributedSampler] = None
        self._progress = {"epoch": 0, "position": 0}  # training samples of this rank consumed in the epoch

    def build_datasets(self) -> Mapping[str, Dataset]:
        """Return ``{"train": …, "val": …, "test": …}`` (``"predict"`` optional)."""
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if stage == "fit":  # a new fit starts at the beginning (a resumed one then loads its progress)
            self._progress, self.sampler = {"epoch": 0, "position": 0}, None
        if not self.datasets:
            self.datasets = self.build_datasets()

    def split_datasets(self, task: str) -> dict[str, Dataset]:
        """The datasets holding ``task``'s samples, by split (here: every split; the model validates
        each task's labels in them at set-up)."""
        self.setup()
        return dict(self.datasets)

    def training_epoch(self, offered: int) -> int:
        """The epoch whose order a training sampler draws when Lightning calls ``set_epoch(offered)``:
        the trainer's ``current_epoch`` (``offered`` without a trainer).

        Lightning offers its count of *processed* epochs. After resuming a run that stopped mid-epoch
        (``max_steps``: Lightning runs the epoch-end hooks and counts the epoch processed, not
        completed) that count is one ahead of the epoch the trainer goes on training, whose
        remaining batches must keep that epoch's order.
        """
        trainer = getattr(self, "trainer", None)
        return offered if trainer is None else int(trainer.current_epoch)

    @property
    def label_keys(self) -> set[str]:
        self.setup()
        dataset = self.datasets["train"]
        keys = getattr(dataset, "keys", None)
        if keys is None:
            keys = set(dataset[0])
        return set(keys) - {self.input_key}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise KeyError(f"{type(self).__name__} has no '{split}' split (it has {sorted(self.datasets)}).")
        sampler = None
        if shuffle:
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = self.sampler = EpochShuffleSampler(self.datasets[split], world, rank, self.seed, self.training_epoch)
            sampler.epoch, sampler.skip = self._progress["epoch"], self._progress["position"]
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_batched,
            persistent_workers=self.num_workers > 0,
            generator=loader_generator(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Once per training batch the loop consumes (the loader may prefetch ahead): the resumable position.
        trainer = getattr(self, "trainer", None)
        if isinstance(self.sampler, EpochShuffleSampler) and trainer is not None and trainer.training:
            if self.sampler.epoch != self._progress["epoch"]:
                self._progress = {"epoch": self.sampler.epoch, "position": self.sampler.skip}
            self._progress["position"] += _batch_length(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Training order state: the epoch and the samples of this rank consumed in it."""
        if self.sampler is not None and self.sampler.epoch != self._progress["epoch"]:
            return {"epoch": self.sampler.epoch, "position": 0}
        return dict(self._progress)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._progress = {"epoch": int(state_dict.get("epoch", 0)), "position": int(state_dict.get("position", 0))}

    def held_out_batches(self, split: str, tasks: Sequence[str], batch_size: Optional[int] = None,
                         seed: int = 0) -> "HeldOutBatches":
        """A stream of batches of ``split`` apart from the training order, sharded by the trainer's
        ranks (:class:`~mtl_lightning.data.held_out.HeldOutBatches`), for a method that evaluates a
        look-ahead on held-out data (Auto-λ). A batch every task reads, or, with one dataset per task
        (``batch_layout == "routed"``), ``{task: sub_batch}`` for each of ``tasks``.

        ``batch_size``: samples per rank and draw (default: the training ``batch_size``). Raises a
        ``ValueError`` when the split (of one of ``tasks``) is missing.
        """
        from mtl_lightning.data.held_out import HeldOutBatches  # it imports mixing, which imports this module

        routed = self.batch_layout == "routed"
        datasets: dict[Optional[str], Dataset] = {}
        for task in tasks if routed else list(tasks)[:1]:
            splits = self.split_datasets(task)
            if split not in splits:
                of = f" for task '{task}'" if routed else ""
                raise ValueError(f"{type(self).__name__} has no '{split}' split{of} (it has {sorted(splits)}).")
            datasets[task if routed else None] = splits[split]
        if not datasets:
            raise ValueError(f"{type(self).__name__}.held_out_batches needs at least one task.")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return HeldOutBatches(datasets, batch_size or self.batch_size, seed, world, rank)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test", shuffle=False)
