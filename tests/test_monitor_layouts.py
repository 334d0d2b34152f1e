"""The negative-transfer monitor on every data layout the framework trains on: one shared batch
(MultiDigits), task-routed batches (DomainDigits, one dataset per task), an expert-mixture model
(MMoE on its synthetic regression), and task-routed batches under DDP (2 gloo processes)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from helpers import quiet_trainer, small_digits
from mtl_lightning.architectures import MMoE
from mtl_lightning.data import CorrelatedRegressionDataModule, DomainDigitsDataModule
from mtl_lightning.models import MLP, MultiTaskModule, SmallCNN
from mtl_lightning.monitoring import NegativeTransferMonitor
from mtl_lightning.tasks import ClassificationTask, RegressionTask

DOMAINS = {"original": 96, "transposed": 64, "inverted": 32}


def digits_case():
    model = MultiTaskModule(SmallCNN(out_features=32), [ClassificationTask("left", 10), ClassificationTask("right", 10)])
    return model, small_digits(num_train=256, num_val=64, num_test=64, batch_size=32)


def domain_case():
    model = MultiTaskModule(SmallCNN(image_size=8, out_features=32), [ClassificationTask(d, 10) for d in DOMAINS])
    return model, DomainDigitsDataModule(policy="all", train_sizes=DOMAINS, batch_size=16)


def mmoe_case():
    encoder = MMoE(MLP(20, (8,)), num_experts=3, in_features=20)
    model = MultiTaskModule(encoder, [RegressionTask("y1", head_hidden=(4,)), RegressionTask("y2", head_hidden=(4,))])
    return model, CorrelatedRegressionDataModule(dim=20, num_train=256, num_val=64, num_test=64, batch_size=32)


@pytest.mark.parametrize("case", [digits_case, domain_case, mmoe_case], ids=["multidigits", "domain_digits", "mmoe"])
def test_monitor_measures_on_every_layout(case, tmp_path):
    pl.seed_everything(0)
    model, dm = case()
    monitor = NegativeTransferMonitor(interval=2, output_dir=str(tmp_path))
    quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0).fit(model, dm)
    assert monitor.measurements >= 2
    t = len(model.task_names)
    # every pair of tasks was measured (each task had labels in the measured steps) and the cosines are real
    assert bool((monitor.cosine_count[~torch.eye(t, dtype=torch.bool)] > 0).all())
    cosine = monitor.mean_cosine
    assert torch.isfinite(cosine).all() and bool((cosine.abs() <= 1 + 1e-6).all())
    assert os.path.exists(tmp_path / "negative_transfer_report.json")


def test_monitor_leaves_the_parameters_bit_for_bit(tmp_path):
    """The lookahead moves the shared parameters in place and must restore them exactly."""
    pl.seed_everything(0)
    model, dm = domain_case()
    monitor = NegativeTransferMonitor(interval=1, output_dir=str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, dm)
    batch = next(iter(dm.train_dataloader()))
    before = [p.detach().clone() for p in model.parameters()]
    monitor.measure(trainer, model, batch)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


class _RankCosines(NegativeTransferMonitor):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        trainer.strategy.barrier()
        torch.save({"cosine": self.cosine_sum, "count": self.cosine_count},
                   os.path.join(self.output_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_monitor_on_task_routed_batches_under_ddp(tmp_path):
    pl.seed_everything(0)
    model, dm = domain_case()
    out = str(tmp_path / "nt")
    monitor = _RankCosines(interval=2, output_dir=out)
    quiet_trainer(max_epochs=1, callbacks=[monitor], strategy="ddp_spawn", devices=2, limit_val_batches=0).fit(model, dm)
    a, b = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    assert torch.equal(a["cosine"], b["cosine"]) and torch.equal(a["count"], b["count"])
    assert bool((a["count"][~torch.eye(3, dtype=torch.bool)] > 0).all()) and torch.isfinite(a["cosine"]).all()
