"""DomainDigits: handwritten digits under three domain shifts, one dataset (and task) per domain.

Built from scikit-learn's bundled ``load_digits`` (8×8, values 0–16, scaled to [0, 1]); nothing is
downloaded. The single digits are split into train/val/test first; each domain then draws its own
training set of a deliberately different size from the training digits and transforms it:

* ``original`` — the image as is;
* ``transposed`` — the image transposed (rows ↔ columns);
* ``inverted`` — 1 − the image (white digit strokes become dark).

Each domain is its own 10-class task whose label key is the domain name. Validation and test use
every val/test digit in each domain. It is a small, offline stand-in for multi-domain benchmarks
such as Office-31: related tasks, unequal dataset sizes, so the mixing policy matters.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mtl_lightning.data.datamodule import TensorDictDataset
from mtl_lightning.data.mixing import MultiDatasetDataModule
from mtl_lightning.data.multidigits import load_digit_images, split_digits
from mtl_lightning.data.policies import MixingPolicy

DOMAINS = {
    "original": lambda x: x,
    "transposed": lambda x: x.transpose(-1, -2),
    "inverted": lambda x: 1.0 - x,
}


class DomainDigitsDataModule(MultiDatasetDataModule):
    """Three digit domains of unequal size, mixed by ``policy`` (see the module docstring).

    Args:
        train_sizes: Training samples per domain (at most the number of training digits,
            ``split_fractions[0]`` × 1797 ≈ 1078); by default 1000 / 300 / 60.
        split_fractions: Fractions of the digits for train and val (the rest is test).
        policy, steps_per_epoch, batch_size, eval_batch_size, num_workers, seed: see
            :class:`~mtl_lightning.data.mixing.MultiDatasetDataModule`.
    """

    def __init__(
        self,
        policy: Union[str, MixingPolicy] = "all",
        train_sizes: Optional[dict[str, int]] = None,
        split_fractions: tuple[float, float] = (0.6, 0.15),
        steps_per_epoch: Optional[int] = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, None, steps_per_epoch, batch_size, eval_batch_size, num_workers, seed)
        self.train_sizes = dict(train_sizes or {"original": 1000, "transposed": 300, "inverted": 60})
        unknown = sorted(set(self.train_sizes) - set(DOMAINS))
        if unknown:
            raise ValueError(f"DomainDigitsDataModule: unknown domain(s) {unknown} in train_sizes; domains: {list(DOMAINS)}.")
        bad = {k: v for k, v in self.train_sizes.items() if v < 1}
        if bad:
            raise ValueError(f"DomainDigitsDataModule: train_sizes must be >= 1, got {bad}.")
        self.split_fractions = split_fractions

    def build_datasets(self) -> dict[str, dict[str, TensorDictDataset]]:  # type: ignore[override]
        images, labels = load_digit_images()
        generator = torch.Generator().manual_seed(self.seed)
        parts = split_digits(len(images), self.split_fractions, generator)
        n_train = len(parts["train"])
        too_big = {d: n for d, n in self.train_sizes.items() if n > n_train}
        if too_big:
            raise ValueError(f"DomainDigitsDataModule: train_sizes {too_big} exceed the {n_train} training digits.")
        datasets: dict[str, dict[str, TensorDictDataset]] = {}
        for domain, size in self.train_sizes.items():
            transform = DOMAINS[domain]
            chosen = {
                "train": parts["train"][torch.randperm(n_train, generator=generator)[:size]],
                "val": parts["val"],
                "test": parts["test"],
            }
            datasets[domain] = {
                split: TensorDictDataset({"input": transform(images[idx]).unsqueeze(1), domain: labels[idx]})
                for split, idx in chosen.items()
            }
        return datasets


__all__ = ["DomainDigitsDataModule", "DOMAINS"]
