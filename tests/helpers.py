"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.models import MultiTaskModule, SmallCNN
from mtl_lightning.tasks import ClassificationTask


def digits_module(**kwargs: Any) -> MultiTaskModule:
    tasks = kwargs.pop("tasks", None) or [ClassificationTask("left", 10), ClassificationTask("right", 10)]
    return MultiTaskModule(SmallCNN(out_features=64), tasks, **kwargs)


def small_digits(**kwargs: Any) -> MultiDigitsDataModule:
    kwargs.setdefault("num_train", 1024)
    kwargs.setdefault("num_val", 256)
    kwargs.setdefault("num_test", 256)
    return MultiDigitsDataModule(**kwargs)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=1, max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
