"""Under DDP (2 gloo processes), history-based balancing state is built from losses reduced across
ranks, so every rank holds the same state although each rank sees different data."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from mtl_lightning import ClassificationTask, MultiTaskModule
from mtl_lightning.balancing import DWA, FAMO
from mtl_lightning.data import TensorDictDataset
from mtl_lightning.data.datamodule import collate_batched
from mtl_lightning.models import MLP

pytestmark = pytest.mark.slow


class SaveRankState(pl.Callback):
    """Writes each rank's balancing state and its local losses at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.local_losses: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            losses = pl_module.compute_losses(batch)[2]
        self.local_losses.append([float(v) for v in losses.values()])

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"state": pl_module.balancer.state_dict(), "local_losses": self.local_losses},
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


def make_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    data = {"input": x, "a": (x[:, 0] > 0).long(), "b": (x[:, 1] + x[:, 2] > 0).long()}
    return torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=16, collate_fn=collate_batched)


@pytest.mark.parametrize("method", [FAMO(), DWA()], ids=["FAMO", "DWA"])
def test_method_state_is_identical_on_every_rank(method, tmp_path):
    pl.seed_everything(0)
    module = MultiTaskModule(MLP(6, (8,)), [ClassificationTask("a", 2), ClassificationTask("b", 2)],
                             optimizer=partial(torch.optim.Adam, lr=0.01))
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=3,
                         callbacks=[method, SaveRankState(str(tmp_path))], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, make_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["local_losses"] != ranks[1]["local_losses"]  # the ranks really saw different data
    states = [r["state"] for r in ranks]
    if isinstance(method, FAMO):
        assert torch.equal(states[0]["logits"], states[1]["logits"])
        assert not torch.equal(states[0]["logits"], torch.zeros(2))  # the logits did move
    else:
        history = [s["history"] for s in states]
        assert history[0]["means"].keys() == history[1]["means"].keys() == {0, 1}
        for epoch in history[0]["means"]:
            assert torch.equal(history[0]["means"][epoch], history[1]["means"][epoch])
        assert torch.equal(history[0]["sums"], history[1]["sums"])
