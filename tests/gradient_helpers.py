"""Shared fixtures of the gradient-method integration tests (also imported by the DDP worker)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from helpers import quiet_trainer
from mtl_lightning.gradients import CAGrad, MGDA
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.registry import gradient_methods
from mtl_lightning.tasks import ClassificationTask

TASKS = ("a", "b", "c")

#: Every registered method in its default mode, and the rep-mode variants worth covering, by test id.
METHODS: dict[str, Callable[[], pl.Callback]] = {
    **gradient_methods(),
    "MGDA-UB": partial(MGDA, mode="rep"),
    "CAGrad-rep": partial(CAGrad, mode="rep"),
}
PARAM_MODE = [n for n in METHODS if METHODS[n]().mode == "param"]


def make_batches(steps: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(batch_size, 8, generator=gen)
        batch = {"input": x}
        for i, name in enumerate(TASKS):
            # Labels that depend on the input differently per task (some conflict).
            score = x[:, i] - 0.8 * x[:, (i + 1) % 8] + 0.3 * torch.randn(batch_size, generator=gen)
            batch[name] = (score > 0).long() + 2 * (x[:, 3 + i] > 0).long()
        batches.append(batch)
    return batches


def split(batches: list[dict[str, torch.Tensor]], parts: int, index: int) -> list[dict[str, torch.Tensor]]:
    """The ``index``-th contiguous slice of every batch (what one DDP rank / one micro-batch sees)."""
    out = []
    for b in batches:
        n = len(b["input"]) // parts
        out.append({k: v[index * n:(index + 1) * n] for k, v in b.items()})
    return out


def interleave_halves(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each batch as two consecutive micro-batches (first half, second half)."""
    return [half for b in batches for half in (split([b], 2, 0)[0], split([b], 2, 1)[0])]


def make_module(accumulate: int = 1, seed: int = 0, lr: float = 0.1) -> MultiTaskModule:
    torch.manual_seed(seed)
    return MultiTaskModule(
        MLP(8, (16, 16)),
        [ClassificationTask(name=n, num_classes=4) for n in TASKS],
        optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9),
        accumulate_grad_batches=accumulate,
    )


def loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def train(method: pl.Callback, batches: list[dict[str, torch.Tensor]], accumulate: int = 1, **trainer_kwargs: Any) -> torch.Tensor:
    module = make_module(accumulate)
    trainer = quiet_trainer(callbacks=[method], max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(batches))
    return flat_parameters(module)


def fit_two_digit_tasks(method: pl.Callback, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                        epochs: int = 2) -> dict[str, float]:
    """The methods' learning check: MultiDigits' two digit tasks on a 144→64 MLP (Adam 3e-3 unless
    ``optimizer``), 1024 training images, ``epochs`` epochs with ``method``; the validation metrics."""
    from mtl_lightning.data import MultiDigitsDataModule

    pl.seed_everything(0)
    module = MultiTaskModule(MLP(144, (64,)), [ClassificationTask(name="left", num_classes=10),
                                               ClassificationTask(name="right", num_classes=10)],
                             optimizer=optimizer or (lambda p: torch.optim.Adam(p, lr=3e-3)))
    data = MultiDigitsDataModule(num_train=1024, batch_size=128)
    trainer = quiet_trainer(callbacks=[method], max_epochs=epochs)
    trainer.fit(module, data)
    return trainer.validate(module, data, verbose=False)[0]


def official_simplex_projection(v: Any) -> Any:
    """The projection onto the simplex of the official MGDA-family code (``_projection2simplex`` of
    MoCo's and MoDo's authors: a sorted-threshold loop), on a NumPy vector."""
    import numpy as np

    m = len(v)
    u = np.sort(v)[::-1]
    tmpsum, tmax_f = 0.0, (v.sum() - 1.0) / m
    for i in range(m - 1):
        tmpsum += u[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > u[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(v - tmax_f, 0.0)
