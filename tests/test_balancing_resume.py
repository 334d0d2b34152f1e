"""Every balancing method resumes exactly, mid-epoch, with shuffled data: N steps straight equal N/2
steps, a checkpoint and N/2 resumed steps — model parameters (learnable weights included), the
method's state (histories, random generators, solver warm starts), optimizer and data order; and a
model that draws random numbers itself (dropout).

The methods are those the packages export (``mtl_lightning.balancing`` and ``mtl_lightning.gradients``):
a new method joins by being exported. Two kinds of checkpoint: one written during the run
(``every_n_train_steps``, as a pre-empted run has) and one written when a run stops at ``max_steps``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same_state, resumable_state
from lightning.pytorch.callbacks import ModelCheckpoint

import mtl_lightning.balancing as balancing
from mtl_lightning import ClassificationTask, MultiTaskModule
from mtl_lightning.balancing import LossWeighting
from mtl_lightning.data import MultiTaskDataModule, TensorDictDataset
from mtl_lightning.gradients import GradientBalancer
from mtl_lightning.models import MLP
from mtl_lightning.registry import balancing_methods

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]

TASKS = ("a", "b", "c")  # three: PCGrad's and GradVac's random partner orders are drawn (not at T = 2)
STEPS = 10  # 3 batches per epoch: the checkpoint at step 5 falls mid-epoch; the run spans 4 epochs

#: Methods whose constructor needs arguments (or whose defaults would leave the short run idle).
OPTIONS: dict[type, dict[str, Any]] = {
    balancing.StaticWeighting: {"weights": {"a": 2.0, "c": 0.5}},
    balancing.STCH: {"warmup_epochs": 1},
    balancing.RLW: {"seed": 1},
}
# Every registered method (the registry lists the two packages' exported methods; the TorchJD adapter
# wraps a weighting given to it and has its own tests).
METHODS = sorted(balancing_methods().values(), key=lambda cls: cls.__name__)


class ShuffledData(MultiTaskDataModule):
    """96 samples, three tasks, batch 32; the training order is the base class's seeded shuffle."""

    def __init__(self) -> None:
        super().__init__(batch_size=32, seed=3)

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        g = torch.Generator().manual_seed(0)
        out = {}
        for split, n in (("train", 96), ("val", 16), ("test", 16)):
            x = torch.randn(n, 6, generator=g)
            out[split] = TensorDictDataset({"input": x, "a": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(),
                                            "b": (x[:, 2] > 0).long(), "c": (x[:, 3] + x[:, 0] > 0).long()})
        return out


def fit(method: type, max_steps: int, ckpt_path: Optional[str] = None, callbacks: tuple = (),
        dropout: float = 0.0) -> dict[str, Any]:
    pl.seed_everything(0 if ckpt_path is None else 123, verbose=False)  # resumed: all from the checkpoint
    module = MultiTaskModule(MLP(6, (16,), dropout=dropout), [ClassificationTask("a", 3), ClassificationTask("b", 2),
                                             ClassificationTask("c", 2)], optimizer=partial(torch.optim.Adam, lr=0.01))
    trainer = pl.Trainer(callbacks=[method(**OPTIONS.get(method, {})), *callbacks], max_steps=max_steps,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=".")
    trainer.fit(module, datamodule=ShuffledData(), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps and trainer.num_training_batches == 3
    return resumable_state(trainer)


def test_the_methods_are_found_in_both_packages():
    names = {cls.__name__ for cls in METHODS}
    assert {"EqualWeighting", "RLW", "FAMO", "DWA", "GradNorm", "PCGrad", "GradVac", "GradDrop", "FairGrad"} <= names
    assert {cls for cls in METHODS if issubclass(cls, LossWeighting)} and {cls for cls in METHODS if issubclass(cls, GradientBalancer)}


def assert_resumes_exactly(method: type, root: Path, dropout: float = 0.0) -> None:
    """Straight run (saving mid-run at step N/2) vs runs resumed from that checkpoint and from the one a
    run stopped at step N/2 writes."""
    during = ModelCheckpoint(dirpath=root / "during", every_n_train_steps=STEPS // 2, save_top_k=-1)
    straight = fit(method, STEPS, callbacks=(during,), dropout=dropout)
    fit(method, STEPS // 2, callbacks=(ModelCheckpoint(dirpath=root / "stop"),), dropout=dropout)  # mid-epoch 1
    for kind in ("during", "stop"):
        (checkpoint,) = (root / kind).glob(f"*-step={STEPS // 2}.ckpt")
        assert torch.load(checkpoint, weights_only=True)["ShuffledData"] == {"epoch": 1, "position": 64}
        resumed = fit(method, STEPS, ckpt_path=str(checkpoint), dropout=dropout)
        assert_same_state(straight, resumed, f"{method.__name__}, resumed from the checkpoint {kind}")


@pytest.mark.parametrize("method", METHODS, ids=lambda cls: cls.__name__)
def test_resume_mid_epoch_matches_uninterrupted_run(method, tmp_path):
    assert_resumes_exactly(method, tmp_path)


def test_dropout_in_the_model_resumes_exactly(tmp_path):
    """The model's own draws come from the global RNG, which the module checkpoints (and which the data
    loaders leave alone)."""
    assert_resumes_exactly(balancing.RLW, tmp_path, dropout=0.3)
