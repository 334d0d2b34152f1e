"""MultiDatasetDataModule with the MultiTaskModule: routing of task-routed batches, errors, resume,
step shares, per-task validation names, the DomainDigits benchmark and its CLI configs."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from mtl_lightning.balancing.base import BalancingContext, BalancingMethod
from mtl_lightning.cli import MTLCLI
from mtl_lightning.data import DomainDigitsDataModule, MultiDatasetDataModule, MultiTaskDataModule, TensorDictDataset
from mtl_lightning.data.policies import AllTasks, Temperature, Uniform
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import ClassificationTask, MultiLabelTask, RegressionTask, TaskConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def synthetic_datasets(sizes: dict[str, int], dim: int = 5, seed: int = 0) -> dict[str, dict[str, TensorDictDataset]]:
    """Per task: a learnable 3-class problem with an ``index`` column to trace samples."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for task, n in sizes.items():
        splits = {}
        for split, size in (("train", n), ("val", 16)):
            x = torch.randn(size, dim, generator=g)
            splits[split] = TensorDictDataset({"input": x, task: (x[:, 0] > 0).long() + (x[:, 1] > 1).long(), "index": torch.arange(size)})
        out[task] = splits
    return out


def small_model(tasks=("a", "b")) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(MLP(5, (16,)), [ClassificationTask(t, 3) for t in tasks])


class PoolEncoder(nn.Module):
    """Accepts images of any size (adaptive pooling), as encoders of multi-dataset setups do."""

    out_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def test_routed_batch_sends_each_shape_and_label_type_to_its_head():
    torch.manual_seed(0)
    tasks = [ClassificationTask("digit", 10), RegressionTask("size", num_outputs=2), MultiLabelTask("tags", 3)]
    model = MultiTaskModule(PoolEncoder(), tasks)
    batch = {
        "digit": {"input": torch.randn(5, 1, 8, 8), "digit": torch.randint(10, (5,))},
        "size": {"input": torch.randn(3, 1, 12, 12), "size": torch.randn(3, 2)},
        "tags": {"input": torch.randn(4, 1, 6, 6), "tags": torch.randint(2, (4, 3)).float()},
    }
    features, outputs, losses = model.compute_losses(batch)
    assert set(features) == set(outputs) == set(losses) == {"digit", "size", "tags"}
    expected = {
        "digit": nn.functional.cross_entropy(model.heads["digit"](model.encoder(batch["digit"]["input"])), batch["digit"]["digit"]),
        "size": nn.functional.mse_loss(model.heads["size"](model.encoder(batch["size"]["input"])), batch["size"]["size"]),
        "tags": nn.functional.binary_cross_entropy_with_logits(
            model.heads["tags"](model.encoder(batch["tags"]["input"])), batch["tags"]["tags"]
        ),
    }
    for name, loss in expected.items():
        assert torch.allclose(losses[name], loss), name
    assert outputs["size"].shape == (3, 2) and outputs["digit"].shape == (5, 10)
    # A one-task batch computes only that task; prediction routes the same way.
    _, outputs, losses = model.compute_losses({"size": batch["size"]})
    assert list(losses) == ["size"] and torch.allclose(losses["size"], expected["size"])
    predictions = model.predict_step({"tags": batch["tags"]}, 0)
    assert list(predictions) == ["tags"] and predictions["tags"].shape == (4, 3)


def test_single_dataset_batches_keep_their_behaviour():
    model = small_model()
    x = torch.randn(6, 5)
    batch = {"input": x, "a": torch.randint(3, (6,)), "b": torch.randint(3, (6,))}
    _, outputs, losses = model.compute_losses(batch)
    feats = model.encoder(x)
    for t in ("a", "b"):
        assert torch.allclose(losses[t], nn.functional.cross_entropy(model.heads[t](feats), batch[t]))


def test_routed_batch_with_unknown_task_raises():
    model = small_model()
    with pytest.raises(KeyError, match=r"unknown task\(s\) \['c'\]"):
        model.compute_losses({"c": {"input": torch.randn(2, 5), "c": torch.zeros(2, dtype=torch.long)}})


class SummedGradients(BalancingMethod):
    """Sums the task losses, but declares it needs every task per step (as gradient methods do)."""

    needs_all_tasks_per_step = True

    def backward(self, ctx: BalancingContext) -> dict[str, torch.Tensor]:
        ctx.backward(torch.stack(list(ctx.losses.values())).sum())
        return {n: torch.ones(()) for n in ctx.losses}


def test_all_tasks_method_refuses_one_task_policy_and_runs_with_all_tasks():
    data = synthetic_datasets({"a": 32, "b": 16})
    trainer = pl.Trainer(max_steps=2, callbacks=[SummedGradients()], limit_val_batches=0, **QUIET)
    with pytest.raises(ValueError, match="SummedGradients needs the loss of every task at every step.*'one'"):
        trainer.fit(small_model(), MultiDatasetDataModule("uniform", data, batch_size=4))
    trainer = pl.Trainer(max_steps=2, callbacks=[SummedGradients()], limit_val_batches=0, **QUIET)
    trainer.fit(small_model(), MultiDatasetDataModule("all", data, batch_size=4))
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "datasets, tasks, message",
    [
        ({"a": 8}, ("a", "b"), r"no dataset for \['b'\]"),
        ({"a": 8, "b": 8, "z": 8}, ("a", "b"), r"no task for dataset\(s\) \['z'\]"),
    ],
)
def test_datasets_must_match_the_tasks(datasets, tasks, message):
    trainer = pl.Trainer(max_steps=1, **QUIET)
    with pytest.raises(TaskConfigError, match=message):
        trainer.fit(small_model(tasks), MultiDatasetDataModule("uniform", synthetic_datasets(datasets), batch_size=4))


def test_task_label_must_be_in_its_own_dataset():
    data = synthetic_datasets({"a": 8, "b": 8})
    model = MultiTaskModule(MLP(5, (8,)), [ClassificationTask("a", 3), ClassificationTask("b", 3, label_key="a")])
    with pytest.raises(TaskConfigError, match="Task 'b' reads label key 'a', which its dataset"):
        pl.Trainer(max_steps=1, **QUIET).fit(model, MultiDatasetDataModule("uniform", data, batch_size=4))


def test_datamodule_rejects_bad_options():
    with pytest.raises(ValueError, match="Unknown mixing policy"):
        MultiDatasetDataModule("sometimes", synthetic_datasets({"a": 8}))
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        MultiDatasetDataModule("uniform", synthetic_datasets({"a": 8}), steps_per_epoch=0)
    with pytest.raises(ValueError, match="task 'a' has no 'train' dataset"):
        MultiDatasetDataModule("uniform", {"a": {"val": TensorDictDataset({"input": torch.zeros(2, 5)})}}).setup()
    with pytest.raises(ValueError, match="pass 'datasets'"):
        MultiDatasetDataModule("uniform").setup()
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['rotated'\]"):
        DomainDigitsDataModule(train_sizes={"rotated": 10})
    dm = MultiDatasetDataModule("uniform", synthetic_datasets({"a": 8}))
    with pytest.raises(KeyError, match="lacks \\['position'\\]"):
        dm.load_state_dict({"seed": 0, "epoch": 0})


class RecordSamples(Callback):
    """Records (epoch, batch_idx, [(task, sample indices)]) of every training step (task "all" for a
    batch of the shared layout)."""

    def __init__(self) -> None:
        self.steps: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        parts = [("all", batch)] if "index" in batch else batch.items()
        plan = tuple((t, tuple(b["index"].tolist())) for t, b in parts)
        self.steps.append((trainer.current_epoch, batch_idx, plan))


def test_resumed_run_continues_the_same_tasks_and_samples(tmp_path):
    data = synthetic_datasets({"a": 40, "b": 24})  # 10 + 6 = 16 steps per epoch with batch 4

    def run(ckpt_path=None, save=False):
        recorder = RecordSamples()
        callbacks = [recorder]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1))
        trainer = pl.Trainer(
            max_epochs=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=save, callbacks=callbacks,
        )
        trainer.fit(small_model(), MultiDatasetDataModule(Temperature(2.0), data, batch_size=4, seed=3), ckpt_path=ckpt_path)
        return recorder.steps

    full = run(save=True)
    assert len(full) == 32 and {s[0] for s in full} == {0, 1}
    assert [s[2] for s in full[:16]] != [s[2] for s in full[16:]], "each epoch draws a new sequence"
    for step in (8, 16, 20):  # mid epoch 0, the epoch boundary, mid epoch 1
        (ckpt,) = glob.glob(str(tmp_path / "ckpt" / f"*-step={step}.ckpt"))
        state = torch.load(ckpt, weights_only=False)["MultiDatasetDataModule"]
        assert state == {"seed": 3, "epoch": (step - 1) // 16, "position": (step - 1) % 16 + 1}
        resumed = run(ckpt_path=ckpt)
        assert [s[2] for s in resumed] == [s[2] for s in full[step:]], f"resume from step {step}"


class IndexedData(MultiTaskDataModule):
    """One dataset (shared layout: a sample carries every task's label), shuffled by the base class."""

    def build_datasets(self):
        return synthetic_datasets({"a": 40})["a"]


@pytest.mark.parametrize("kind", ["shared", "mixing"])
def test_run_stopped_at_max_steps_mid_epoch_resumes_the_same_samples(kind, tmp_path):
    """A run that stops at max_steps inside an epoch is saved at that epoch's end hooks; Lightning then
    hands the training sampler its count of processed epochs (one ahead). The data module draws the
    epoch the trainer trains (current_epoch), so the rest of the stopped epoch keeps its order."""

    def run(max_steps, ckpt_path=None, save=False):
        recorder = RecordSamples()
        callbacks = [recorder, ModelCheckpoint(dirpath=tmp_path / "ckpt")] if save else [recorder]
        trainer = pl.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=save, callbacks=callbacks)
        data = (IndexedData(batch_size=4, seed=3) if kind == "shared"
                else MultiDatasetDataModule(Temperature(2.0), synthetic_datasets({"a": 24, "b": 16}), batch_size=4, seed=3))
        trainer.fit(small_model(("a",) if kind == "shared" else ("a", "b")), data, ckpt_path=ckpt_path)
        return recorder.steps

    straight = run(24)  # 10 steps per epoch
    assert len(straight) == 24 and straight[13][:2] == (1, 3)
    run(13, save=True)
    (ckpt,) = glob.glob(str(tmp_path / "ckpt" / "*-step=13.ckpt"))
    assert torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2
    assert run(24, ckpt_path=ckpt) == straight[13:]


def test_step_shares_and_validation_metric_names():
    data = synthetic_datasets({"a": 64, "b": 16, "c": 16})
    dm = MultiDatasetDataModule(Uniform(), data, batch_size=4, steps_per_epoch=30, seed=1)
    trainer = pl.Trainer(max_epochs=1, **QUIET)
    trainer.fit(small_model(("a", "b", "c")), dm)
    plans = dm.sampler.epoch_plan(0)
    metrics = trainer.callback_metrics
    for task in ("a", "b", "c"):
        realized = sum(plan[0][0] == task for plan in plans) / 30
        assert float(metrics[f"train/{task}/step_share"]) == pytest.approx(realized)
        assert f"val/{task}/accuracy" in metrics and f"val/{task}/loss" in metrics
    assert not [k for k in metrics if "dataloader_idx" in k]


def test_validation_metrics_are_computed_on_each_task_own_data():
    data = synthetic_datasets({"a": 16, "b": 16})
    model = small_model()
    dm = MultiDatasetDataModule("all", data, batch_size=4, eval_batch_size=5)
    per_loader = pl.Trainer(**QUIET).validate(model, dm, verbose=False)
    # Lightning returns one dict per loader; epoch-level metrics are named by task, not loader.
    assert len(per_loader) == 2 and per_loader[0] == per_loader[1]
    results = per_loader[0]
    model.eval()
    for task in ("a", "b"):
        val = data[task]["val"].tensors
        with torch.no_grad():
            logits = model.heads[task](model.encoder(val["input"]))
        assert results[f"val/{task}/loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, val[task])), rel=1e-5)
        accuracy = float((logits.argmax(-1) == val[task]).float().mean())
        assert results[f"val/{task}/accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_domain_digits_has_unequal_domains_and_a_model_learns_it():
    dm = DomainDigitsDataModule(policy=Temperature(2.0), batch_size=32, seed=0)
    dm.setup()
    assert {t: len(s["train"]) for t, s in dm.datasets.items()} == {"original": 1000, "transposed": 300, "inverted": 60}
    original, transposed, inverted = (dm.datasets[d]["val"].tensors for d in ("original", "transposed", "inverted"))
    assert torch.equal(transposed["input"], original["input"].transpose(-1, -2))
    assert torch.allclose(inverted["input"], 1 - original["input"])
    assert torch.equal(original["original"], inverted["inverted"])
    torch.manual_seed(0)
    model = MultiTaskModule(
        MLP(64, (64,)),
        [ClassificationTask(d, 10) for d in ("original", "transposed", "inverted")],
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
    )
    trainer = pl.Trainer(max_epochs=2, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, dm)
    accuracy = {d: float(trainer.callback_metrics[f"val/{d}/accuracy"]) for d in ("original", "transposed", "inverted")}
    assert min(accuracy.values()) > 0.3, accuracy  # chance is 0.1


CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "domain_digits", "*.yaml")))


def test_every_policy_config_instantiates(monkeypatch):
    monkeypatch.syspath_prepend(REPO)  # the scheduled config imports experiments.domain_digits.schedules
    assert len(CONFIGS) == 10
    seen = set()
    for path in CONFIGS:
        cli = MTLCLI(args=["--config", path, "--trainer.logger", "false"], run=False)
        assert isinstance(cli.datamodule, DomainDigitsDataModule)
        seen.add(type(cli.datamodule.policy).__name__)
        if "all_" in path:
            assert isinstance(cli.datamodule.policy, AllTasks) and cli.datamodule.tasks_per_step == "all"
    assert seen == {"AllTasks", "Uniform", "Proportional", "Temperature", "Annealed", "RoundRobin", "Explicit", "Scheduled"}


@pytest.mark.slow
def test_cli_fit_with_a_policy_shorthand():
    path = os.path.join(REPO, "experiments", "domain_digits", "annealed.yaml")
    cli = MTLCLI(args=[
        "fit", "--config", path, "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--data.init_args.steps_per_epoch", "6", "--trainer.limit_val_batches", "1",
    ])
    assert cli.trainer.global_step == 6
    assert sum(float(cli.trainer.callback_metrics[f"train/{d}/step_share"]) for d in ("original", "transposed", "inverted")) == pytest.approx(1.0)


def test_state_round_trip_and_reloaded_loader_keep_the_position():
    data = synthetic_datasets({"a": 40, "b": 24})
    dm = MultiDatasetDataModule(Uniform(), data, batch_size=4, seed=7)
    full = [[(t, i.tolist()) for t, i in plan] for plan in dm.train_dataloader().sampler.epoch_plan(1)]
    dm.sampler.set_epoch(1)
    dm.sampler.consumed = 5  # as if the trainer had taken 5 steps of epoch 1
    assert dm.state_dict() == {"seed": 7, "epoch": 1, "position": 5}
    reloaded = dm.train_dataloader()  # e.g. reload_dataloaders_every_n_epochs
    fresh = MultiDatasetDataModule(Uniform(), data, batch_size=4, seed=0)
    fresh.load_state_dict(dm.state_dict())  # the checkpoint's seed wins over the config's
    for loader in (reloaded, fresh.train_dataloader()):
        assert len(loader) == 16
        rest = [[(t, b["index"].tolist()) for t, b in batch.items()] for batch in loader]
        assert rest == full[5:]
