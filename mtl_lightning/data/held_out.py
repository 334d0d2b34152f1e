"""Held-out batches: a second, independent stream of batches from one split of a data module.

Bilevel balancing methods (:class:`~mtl_lightning.balancing.AutoLambda`) evaluate a look-ahead step
on data the step did not train on. :class:`HeldOutBatches`, which a data module makes with
:meth:`~mtl_lightning.data.MultiTaskDataModule.held_out_batches`, draws those batches from a split of the
data module (``"val"``, ``"train"`` — a second, independently shuffled pass over the training data,
as the official Auto-λ code does — or any other split the data module has) without touching the
training loader, its sampler or the global RNG: the training order is the same with or without it.

Draw k is a pure function of (seed, k, world size, rank), so the method that draws only keeps the
number of draws (in its checkpoint state) and a resumed run draws exactly what an uninterrupted one
would.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.mixing import epoch_generator, fetch_batch


class HeldOutBatches:
    """An endless, deterministic stream of batches of ``datasets`` (one per stream), sharded by rank.

    For each dataset of N samples, with per-rank batch b = min(``batch_size``, N // world size) and
    K = N // (b · world size) draws per pass: draw k belongs to pass p = k // K, whose permutation of
    the N samples is drawn from (``seed``, p, stream) alone (the same on every rank); draw k takes
    the (k mod K)-th block of b · world size samples of it, and rank r the r-th slice of b. Ranks thus
    see disjoint samples, and their union is what one process with batch b · world size would see.
    Samples of the last incomplete block of a pass are left out of that pass (as ``drop_last``).

    Args:
        datasets: The streams: ``{None: dataset}`` for a batch every task reads (shared layout) or
            ``{task: dataset}`` for a task-routed batch ``{task: sub_batch}`` (one dataset per task).
        batch_size: Samples per rank and draw (fewer when a dataset is smaller than that on every rank).
        seed: Seed of the permutations.
        world_size: Number of DDP ranks; rank: this process's rank.

    Examples:
        >>> from mtl_lightning.data import TensorDictDataset
        >>> data = TensorDictDataset({"input": torch.arange(6.0), "y": torch.arange(6)})
        >>> stream = HeldOutBatches({None: data}, batch_size=2, seed=0)
        >>> stream.draws_per_pass
        3
        >>> [stream.batch(k)["y"].tolist() for k in range(4)]  # the fourth draw starts a new pass
        [[5, 1], [3, 4], [0, 2], [0, 2]]
        >>> [HeldOutBatches({None: data}, 2, seed=0, world_size=2, rank=r).batch(0)["y"].tolist() for r in (0, 1)]
        [[5, 1], [3, 4]]
        >>> HeldOutBatches({None: data}, 4, seed=0).batch(0)["y"].tolist()  # one process, both ranks' samples
        [5, 1, 3, 4]
    """

    def __init__(self, datasets: Mapping[Optional[str], Dataset], batch_size: int, seed: int = 0,
                 world_size: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"HeldOutBatches: batch_size must be >= 1, got {batch_size}.")
        if not datasets:
            raise ValueError("HeldOutBatches needs at least one dataset.")
        if not 0 <= rank < world_size:
            raise ValueError(f"HeldOutBatches: rank {rank} is not in [0, {world_size}).")
        self.datasets = dict(datasets)
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.sizes: dict[Optional[str], int] = {}
        self.rank_batch: dict[Optional[str], int] = {}
        for key, dataset in self.datasets.items():
            size = len(dataset)  # type: ignore[arg-type]
            if size < world_size:
                name = "" if key is None else f" of task '{key}'"
                raise ValueError(
                    f"HeldOutBatches: the dataset{name} has {size} sample(s), fewer than the {world_size} ranks."
                )
            self.sizes[key] = size
            self.rank_batch[key] = min(batch_size, size // world_size)
        self._permutations: dict[Optional[str], tuple[int, Tensor]] = {}

    @property
    def routed(self) -> bool:
        """Whether a batch is task-routed (``{task: sub_batch}``)."""
        return None not in self.datasets

    @property
    def draws_per_pass(self) -> int:
        """K of the first stream (each stream has its own)."""
        return self._draws_per_pass(next(iter(self.datasets)))

    def _draws_per_pass(self, key: Optional[str]) -> int:
        return self.sizes[key] // (self.rank_batch[key] * self.world_size)

    def _permutation(self, key: Optional[str], stream: int, epoch: int) -> Tensor:
        cached = self._permutations.get(key)
        if cached is None or cached[0] != epoch:
            generator = epoch_generator(self.seed, epoch * len(self.datasets) + stream)
            cached = (epoch, torch.randperm(self.sizes[key], generator=generator))
            self._permutations[key] = cached
        return cached[1]

    def indices(self, draw: int, key: Optional[str] = None) -> tuple[int, Tensor]:
        """(pass, sample indices) of this rank's part of draw ``draw`` of stream ``key``."""
        if draw < 0:
            raise ValueError(f"HeldOutBatches: draw must be >= 0, got {draw}.")
        stream = list(self.datasets).index(key)
        per_pass = self._draws_per_pass(key)
        epoch, step = divmod(draw, per_pass)
        b = self.rank_batch[key]
        start = (step * self.world_size + self.rank) * b
        return epoch, self._permutation(key, stream, epoch)[start:start + b]

    def _fetch(self, key: Optional[str], draw: int) -> Any:
        dataset = self.datasets[key]
        epoch, indices = self.indices(draw, key)
        if getattr(dataset, "epoch_keyed", False):  # augmented per (epoch, index), see EpochShuffleSampler
            keys: Any = [(epoch, int(i)) for i in indices]
            return fetch_batch(dataset, keys)
        return fetch_batch(dataset, indices)

    def batch(self, draw: int) -> Any:
        """This rank's batch of draw ``draw``: one batch, or ``{task: sub_batch}`` when routed."""
        if not self.routed:
            return self._fetch(None, draw)
        return {task: self._fetch(task, draw) for task in self.datasets}

