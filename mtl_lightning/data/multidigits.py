"""MultiDigits: two overlaid handwritten digits, an offline analogue of MultiMNIST.

Built from scikit-learn's bundled ``load_digits`` (1797 images, 8×8, values 0–16), so nothing is
downloaded. Single digits are split into train/val/test first and pairs are formed within each
split: digit a at canvas[0:8, 0:8], digit b at canvas[4:12, 4:12] of a 12×12 canvas, combined by
max (the MultiMNIST construction of Sabour et al., NeurIPS 2017, as used by Sener & Koltun, NeurIPS
2018, at digit scale). Tasks: ``left`` and ``right`` digit (10 classes each).

Optional auxiliary tasks (``aux_tasks``):

* ``sum`` — classification of a + b (19 classes);
* ``present`` — multi-label: which of the 10 digits appear;
* ``random`` — a fixed random label per sample (10 classes): a negative-transfer control;
* ``left_x1000`` — regression of the left digit × 1000 (MSE): a loss-scale-imbalance control.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset

AUX_TASKS = ("sum", "present", "random", "left_x1000")
_MISSING = {"left": -100, "right": -100, "sum": -100, "random": -100}


def load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits as float images in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


def split_digits(num_images: int, split_fractions: tuple[float, float], generator: torch.Generator) -> dict[str, Tensor]:
    """Indices of the single digits in each split: a random permutation cut into train / val / test
    by ``split_fractions`` (train, val; the rest is test)."""
    order = torch.randperm(num_images, generator=generator)
    n_train = int(split_fractions[0] * num_images)
    n_val = int(split_fractions[1] * num_images)
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def overlay_pairs(images: Tensor, labels: Tensor, num_pairs: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random pairs of the given digits on a 12×12 canvas, with left/right/sum/present labels."""
    a = torch.randint(len(images), (num_pairs,), generator=generator)
    b = torch.randint(len(images), (num_pairs,), generator=generator)
    canvas = torch.zeros(num_pairs, 1, 12, 12)
    canvas[:, 0, 0:8, 0:8] = images[a]
    canvas[:, 0, 4:12, 4:12] = torch.maximum(canvas[:, 0, 4:12, 4:12], images[b])
    left, right = labels[a], labels[b]
    present = torch.zeros(num_pairs, 10)
    present[torch.arange(num_pairs), left] = 1.0
    present[torch.arange(num_pairs), right] = 1.0
    return {
        "input": canvas,
        "left": left,
        "right": right,
        "sum": left + right,
        "present": present,
        "random": torch.randint(10, (num_pairs,), generator=generator),
        "left_x1000": left.float() * 1000.0,
    }


def drop_labels(data: dict[str, Tensor], key: str, rate: float, generator: torch.Generator) -> None:
    """Mark a fraction ``rate`` of ``key``'s labels as missing (ignore index, NaN, or -1 rows)."""
    drop = torch.rand(len(data[key]), generator=generator) < rate
    if key in _MISSING:
        data[key] = torch.where(drop, torch.full_like(data[key], _MISSING[key]), data[key])
    elif key == "present":
        data[key] = torch.where(drop[:, None], torch.full_like(data[key], -1.0), data[key])
    else:
        data[key] = torch.where(drop, torch.full_like(data[key], float("nan")), data[key])


class MultiDigitsDataModule(MultiTaskDataModule):
    """MultiDigits pairs (see module docstring).

    Args:
        num_train: Training pairs. num_val: Validation pairs. num_test: Test pairs.
        aux_tasks: Auxiliary label sets to provide, from ``sum``, ``present``, ``random``, ``left_x1000``.
        missing_labels: Fraction in [0, 1] of training samples whose label of a task is missing, e.g.
            ``{"right": 0.3}`` (to study partially labelled data; 1.0 leaves the task no labelled
            training sample, which the model refuses at set-up).
        split_fractions: Fractions of the single digits for train and val (the rest is test).
    """

    def __init__(
        self,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 2000,
        aux_tasks: tuple[str, ...] = (),
        missing_labels: Optional[dict[str, float]] = None,
        split_fractions: tuple[float, float] = (0.6, 0.15),
        batch_size: int = 128,
        eval_batch_size: Optional[int] = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        unknown = sorted(set(aux_tasks) - set(AUX_TASKS))
        if unknown:
            raise ValueError(f"MultiDigitsDataModule: unknown aux task(s) {unknown}; choose from {list(AUX_TASKS)}.")
        self.keys = ["input", "left", "right", *aux_tasks]
        self.missing_labels = dict(missing_labels or {})
        bad = sorted(set(self.missing_labels) - set(self.keys[1:]))
        if bad:
            raise ValueError(f"MultiDigitsDataModule: missing_labels names unknown task(s) {bad}; tasks: {self.keys[1:]}.")
        for key, rate in self.missing_labels.items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise ValueError(
                    f"MultiDigitsDataModule: missing_labels['{key}'] = {rate!r} must be a fraction in [0, 1] "
                    f"(the share of the training labels of task '{key}' to drop)."
                )
        self.num_pairs = {"train": num_train, "val": num_val, "test": num_test}
        self.split_fractions = split_fractions

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        images, labels = load_digit_images()
        generator = torch.Generator().manual_seed(self.seed)
        parts = split_digits(len(images), self.split_fractions, generator)
        datasets = {}
        for split, idx in parts.items():
            data = overlay_pairs(images[idx], labels[idx], self.num_pairs[split], generator)
            data = {k: data[k] for k in self.keys}
            if split == "train":
                for key, rate in self.missing_labels.items():
                    drop_labels(data, key, rate, generator)
            datasets[split] = TensorDictDataset(data)
        return datasets
