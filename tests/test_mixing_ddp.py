"""Task mixing under DDP (2 CPU processes, gloo, ddp_spawn): every rank trains the same task at the
same step, ranks see disjoint shards, and no sample repeats within a pass over a task's data."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mtl_lightning.data import MultiDatasetDataModule, TensorDictDataset
from mtl_lightning.data.policies import Temperature
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import ClassificationTask

SIZES = {"a": 48, "b": 16}  # multiples of batch_size × world_size = 8
BATCH = 4


class WriteSamples(Callback):
    """Each rank writes the (epoch, task, sample indices) of its training steps and its val metrics."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.steps: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([trainer.current_epoch, {t: b["index"].tolist() for t, b in batch.items()}])

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.folder, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"steps": self.steps, "val": sorted(trainer.callback_metrics)}, f)


def datasets() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for task, n in SIZES.items():
        x = torch.randn(n, 5, generator=g)
        out[task] = {
            split: TensorDictDataset({"input": x, task: (x[:, 0] > 0).long(), "index": torch.arange(n)})
            for split in ("train", "val")
        }
    return out


@pytest.mark.slow
def test_ddp_ranks_share_tasks_and_split_samples(tmp_path):
    model = MultiTaskModule(MLP(5, (8,)), [ClassificationTask(t, 2) for t in SIZES])
    dm = MultiDatasetDataModule(Temperature(1.0), datasets(), batch_size=BATCH, seed=5)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[WriteSamples(str(tmp_path))],
    )
    trainer.fit(model, dm)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    per_epoch = 48 // 8 + 16 // 8
    assert len(steps0) == len(steps1) == 2 * per_epoch
    streams: dict = defaultdict(list)  # (epoch, task) -> indices of both ranks, step by step
    for (epoch0, plan0), (epoch1, plan1) in zip(steps0, steps1):
        assert epoch0 == epoch1 and list(plan0) == list(plan1), "ranks must train the same task at the same step"
        for task in plan0:
            shard0, shard1 = plan0[task], plan1[task]
            assert len(shard0) == len(shard1) == BATCH and not set(shard0) & set(shard1)
            streams[(epoch0, task)] += shard0 + shard1
    for (epoch, task), indices in streams.items():
        n = SIZES[task]
        for start in range(0, len(indices), n):  # every full pass is a permutation: no repeats
            chunk = indices[start : start + n]
            assert len(set(chunk)) == len(chunk), (epoch, task, start)
    # Both tasks trained, with a different sequence in each epoch.
    assert {t for _, t in streams} == set(SIZES)
    assert [list(p) for e, p in steps0 if e == 0] != [list(p) for e, p in steps0 if e == 1]
    for r in ranks:
        assert {"val/a/accuracy", "val/b/accuracy"} <= set(r["val"])
        assert not [k for k in r["val"] if "dataloader_idx" in k]
