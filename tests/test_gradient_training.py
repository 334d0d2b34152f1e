"""Gradient methods inside Lightning: DDP equivalence, accumulation, resume, fp16 loss scaling, learning."""

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from gradient_helpers import (
    METHODS, PARAM_MODE, flat_parameters, interleave_halves, loader, make_batches, make_module, quiet_trainer, train,
)
from helpers import run_ddp_worker
from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.gradients import (
    ConFIG, DBMTL, DualProj, FairGrad, GradDrop, GradVac, IMTLG, MGDA, NashMTL, PCGrad, SDMGrad,
)
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.tasks import ClassificationTask

HERE = Path(__file__).parent


pytestmark = pytest.mark.one_thread


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_ddp_worker("ddp_gradient_worker.py", tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_two_processes_on_half_batches_equal_one_process(ddp_results, method):
    initial = flat_parameters(make_module())
    reference = ddp_results["reference"][method]
    assert (reference - initial).abs().max() > 1e-3  # the run actually moved the parameters
    torch.testing.assert_close(ddp_results["rank0"][method], ddp_results["rank1"][method], rtol=0, atol=0)
    torch.testing.assert_close(ddp_results["rank0"][method], reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", PARAM_MODE)
def test_param_mode_accumulation_equals_the_full_batch(method):
    batches = make_batches(3, 16)
    full = train(METHODS[method](), batches)
    accumulated = train(METHODS[method](), interleave_halves(batches), accumulate=2)
    torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-5)


def _fp16(scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6))


@pytest.mark.parametrize("method", [FairGrad, DBMTL, IMTLG, NashMTL, GradDrop, SDMGrad])
def test_fp16_loss_scale_does_not_change_scale_dependent_methods(method):
    batches = make_batches(3, 16)
    unit = train(method(), batches, plugins=[_fp16(1.0)])
    scaled = train(method(), batches, plugins=[_fp16(2.0**12)])
    torch.testing.assert_close(scaled, unit, rtol=0, atol=2e-4)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    module = make_module()
    before = flat_parameters(module)
    plugin = _fp16(2.0**126)
    quiet_trainer(callbacks=[FairGrad()], max_steps=1, plugins=[plugin]).fit(module, loader(make_batches(1, 16)))
    torch.testing.assert_close(flat_parameters(module), before, rtol=0, atol=0)
    assert plugin.scaler.get_scale() < 2.0**126


def test_missing_task_in_a_batch_names_it():
    batch = make_batches(1, 8)[0]
    batch["b"] = torch.full_like(batch["b"], -100)  # no labelled sample for task b
    with pytest.raises(ValueError, match=r"PCGrad needs the loss of every task.*\['b'\]"):
        quiet_trainer(callbacks=[PCGrad()], max_steps=1).fit(make_module(), loader([batch]))


@pytest.mark.slow
@pytest.mark.parametrize("method", [NashMTL, partial(MGDA, mode="rep"), GradVac, DualProj, ConFIG, SDMGrad],
                         ids=["NashMTL", "MGDA-UB", "GradVac", "DualProj", "ConFIG", "SDMGrad"])
def test_gradient_method_learns_multidigits(method):
    pl.seed_everything(0)
    module = MultiTaskModule(MLP(144, (64,)), [ClassificationTask(name="left", num_classes=10),
                                               ClassificationTask(name="right", num_classes=10)],
                             optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    data = MultiDigitsDataModule(num_train=1024, batch_size=128)
    trainer = quiet_trainer(callbacks=[method()], max_epochs=2)
    trainer.fit(module, data)
    result = trainer.validate(module, data, verbose=False)[0]
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1


def test_cli_runs_a_gradient_method_from_yaml():
    from mtl_lightning.cli import MTLCLI

    root = HERE.parent / "experiments" / "multidigits"
    cli = MTLCLI(args=["fit", "--config", str(root / "ew.yaml"), "--config", str(root / "nash_mtl.yaml"),
                       "--trainer.fast_dev_run=2", "--trainer.logger=false", "--data.init_args.num_train=256",
                       "--trainer.enable_progress_bar=false"])
    (method,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, NashMTL)]
    assert method.mode == "param" and method.max_norm == 1.0
    assert method.steps == 2 and method.alpha is not None and bool((method.alpha > 0).all())
