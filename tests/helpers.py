"""Small builders shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
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


def run_ddp_worker(script: str, out: Path) -> dict[str, Any]:
    """Run ``tests/<script>`` (1 process, then 2 gloo processes) writing into ``out``; return its
    reference.pt, rank0.pt and rank1.pt."""
    import torch

    here = Path(__file__).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    proc = subprocess.run([sys.executable, str(here / script), str(out), port], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: torch.load(out / f"{name}.pt") for name in ("reference", "rank0", "rank1")}
