"""NegativeTransferMonitor: signals against hand computations and torch's optimizers, rules,
actions, reporting, planted structure, MultiDigits, DDP and the baselines command."""

from __future__ import annotations

import copy
import json
import os
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import quiet_trainer
from mtl_lightning.data import MultiDigitsDataModule, PlantedGroupsDataModule
from mtl_lightning.models import MultiTaskModule
from mtl_lightning.models.encoders import MLP, SmallCNN
from mtl_lightning.monitoring import NegativeTransferMonitor, gradient_geometry, lookahead_updates, select_networks
from mtl_lightning.monitoring.grouping import _partitions
from mtl_lightning.tasks import ClassificationTask, RegressionTask


pytestmark = pytest.mark.one_thread


def _trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{"num_sanity_val_steps": 0, **kwargs})


def _planted_model(dm: PlantedGroupsDataModule, lr: float = 1e-2) -> MultiTaskModule:
    tasks = [RegressionTask(n, num_outputs=dm.outputs_per_task) for n in dm.task_names]
    return MultiTaskModule(MLP(dm.input_dim, (64, dm.latent_dim)), tasks, optimizer=partial(torch.optim.Adam, lr=lr))


def _digits_model(lr: float = 2e-3) -> MultiTaskModule:
    tasks = [ClassificationTask("left", 10), ClassificationTask("right", 10)]
    return MultiTaskModule(SmallCNN(channels=(8, 16), out_features=32), tasks, optimizer=partial(torch.optim.Adam, lr=lr))


# ---------------------------------------------------------------------------- signals
def test_gradient_geometry_matches_hand_computation():
    J = torch.tensor([[3.0, 4.0], [-4.0, 3.0], [6.0, 8.0], [0.0, 0.0]])
    geo = gradient_geometry(J)
    assert torch.allclose(geo["norms"], torch.tensor([5.0, 5.0, 10.0, 0.0], dtype=torch.float64))
    assert geo["cosine"][0, 1] == pytest.approx(0.0, abs=1e-12)  # orthogonal
    assert geo["cosine"][0, 2] == pytest.approx(1.0)
    assert geo["cosine"][1, 2] == pytest.approx(0.0, abs=1e-12)
    assert geo["gms"][0, 1] == pytest.approx(1.0)  # equal norms
    assert geo["gms"][0, 2] == pytest.approx(2 * 5 * 10 / (25 + 100))
    assert torch.isnan(geo["cosine"][3]).all() and torch.isnan(geo["gms"][:, 3]).all()


def _reference_update(optimizer_factory, params, grad_history, task_grad):
    """Run the real optimizer: steps on ``grad_history``, then one step on ``task_grad``; return Δθ."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    opt = optimizer_factory(params)
    for grads in grad_history:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    before = [p.detach().clone() for p in params]
    return params, opt, before


@pytest.mark.parametrize(
    "factory",
    [
        partial(torch.optim.SGD, lr=0.1),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, dampening=0.0),
        partial(torch.optim.SGD, lr=0.1, momentum=0.5, dampening=0.3, maximize=True),
        partial(torch.optim.Adam, lr=0.01),
        partial(torch.optim.Adam, lr=0.01, weight_decay=0.1, amsgrad=True),
        partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "sgd-momentum-wd", "nesterov", "dampening-maximize", "adam", "adam-wd-amsgrad", "adamw"],
)
@pytest.mark.parametrize("history", [0, 3], ids=["fresh", "with-state"])
def test_lookahead_follows_the_real_optimizer(factory, history):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (2,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grad_history = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(history)]
    task_grads = [torch.randn(2, *s, generator=gen) for s in shapes]  # 2 tasks
    live, opt, before = _reference_update(factory, params, grad_history, None)
    state_before = copy.deepcopy(opt.state_dict())
    updates, note = lookahead_updates(opt, live, task_grads)
    assert note is None
    assert repr(opt.state_dict()) == repr(state_before), "the lookahead must not write the optimizer state"
    for t in range(2):
        ref_params, ref_opt, _ = _reference_update(factory, params, grad_history, None)
        for p, g in zip(ref_params, task_grads):
            p.grad = g[t].clone()
        ref_opt.step()
        for k, (p, b) in enumerate(zip(ref_params, before)):
            assert torch.allclose(updates[k][t], p.detach() - b, atol=1e-6, rtol=1e-5), (t, k)


def test_lookahead_falls_back_to_sgd_with_a_note():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.RMSprop([p], lr=0.5)
    (update,), note = lookahead_updates(opt, [p], [torch.ones(2, 3)])
    assert "RMSprop" in note and "plain SGD" in note
    assert torch.allclose(update, torch.full((2, 3), -0.5))
    with pytest.raises(ValueError, match="not in the optimizer"):
        lookahead_updates(opt, [torch.nn.Parameter(torch.ones(1))], [torch.ones(2, 1)])


# ---------------------------------------------------------------------------- grouping
def test_partitions_are_enumerated_exactly_once():
    parts = list(_partitions(list(range(5)), 5))
    assert len(parts) == 52  # Bell(5)
    assert len({tuple(sorted(tuple(sorted(b)) for b in p)) for p in parts}) == 52
    assert len(list(_partitions(list(range(5)), 2))) == 16  # S(5,1) + S(5,2)


def test_network_selection_recovers_planted_affinity_blocks():
    Z = torch.full((5, 5), -1.0)
    Z[0, 1] = Z[1, 0] = Z[2, 3] = Z[3, 2] = 1.0
    names = ["a1", "a2", "b1", "b2", "r"]
    best = select_networks(Z, names)
    assert best.groups == [["a1", "a2"], ["b1", "b2"], ["r"]]
    assert best.score == pytest.approx(4 / 5)
    two = select_networks(Z, names, max_networks=2)
    assert len(two.groups) == 2 and ["a1", "a2"] in two.groups
    # All-positive affinities: one network, fewest networks on ties.
    assert select_networks(torch.ones(3, 3), ["x", "y", "z"]).groups == [["x", "y", "z"]]
    with pytest.raises(ValueError, match="limited to 10 tasks"):
        select_networks(torch.zeros(11, 11), [str(i) for i in range(11)])
    with pytest.raises(ValueError, match="affinity of shape"):
        select_networks(torch.zeros(2, 3), ["x", "y"])


# ---------------------------------------------------------------------------- options and baselines
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(action="explode"), "action must be one of"),
        (dict(interval=0), "interval must be an integer >= 1"),
        (dict(window=0), "window must be"),
        (dict(downweight_factor=1.5), "downweight_factor"),
        (dict(max_networks=0), "max_networks"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NegativeTransferMonitor(**kwargs)


def _setup(monitor, model):
    monitor.setup(SimpleNamespace(), model, "fit")


def test_baselines_are_validated_and_installed(tmp_path):
    model = _digits_model()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['middle'\]"):
        _setup(NegativeTransferMonitor(baselines={"middle": {"accuracy": 0.9}}), model)
    with pytest.raises(ValueError, match=r"task 'left' name unknown metric\(s\) \['mse'\]"):
        _setup(NegativeTransferMonitor(baselines={"left": {"mse": 0.9}}), model)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        _setup(NegativeTransferMonitor(baselines_file="nope.yaml"), model)
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"left": {"accuracy": 0.9}, "right": {"accuracy": 0.8, "f1": 0.7}}))
    _setup(NegativeTransferMonitor(baselines_file=str(path)), model)
    assert model.tasks["left"].baselines == {"accuracy": 0.9}
    assert model.tasks["right"].baselines == {"accuracy": 0.8, "f1": 0.7}
    with pytest.raises(ValueError, match="has baseline 0.9 in its task config but 0.5"):
        _setup(NegativeTransferMonitor(baselines={"left": {"accuracy": 0.5}}), model)
    single = MultiTaskModule(MLP(4, (8,)), [RegressionTask("y")])
    with pytest.raises(ValueError, match="at least two tasks"):
        _setup(NegativeTransferMonitor(), single)


# ---------------------------------------------------------------------------- rules and actions
def _fake_trainer(step: int = 7):
    return SimpleNamespace(global_step=step, current_epoch=1, loggers=[], should_stop=False)


def _monitor_with_window(matrices, **kwargs):
    monitor = NegativeTransferMonitor(window=max(len(matrices), 1), **kwargs)
    model = _planted_model(PlantedGroupsDataModule())
    _setup(monitor, model)
    for m in matrices:
        monitor._record({"losses": torch.ones(5), "affinity": m.double(), "cosine": torch.zeros(5, 5, dtype=torch.float64),
                         "gms": torch.ones(5, 5, dtype=torch.float64), "norms": torch.ones(5, dtype=torch.float64)})
    return monitor, model


def _planted_affinities(count: int, seed: int = 0):
    """Group blocks help each other, hurt across groups; task 4 hurts everyone (plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.full((5, 5), -0.002)
    base[0, 1] = base[1, 0] = base[2, 3] = base[3, 2] = 0.01
    base[4, :4] = -0.004
    return [base + 0.001 * torch.randn(5, 5, generator=gen) for _ in range(count)]


def test_harm_rule_flags_the_task_that_hurts_everyone_not_the_group_members():
    monitor, model = _monitor_with_window(_planted_affinities(10))
    trainer = _fake_trainer()
    monitor._apply_harm_rule(trainer, model)
    assert [(f["task"], f["rule"], f["step"]) for f in monitor.flagged] == [("random", "harms_others", 7)]
    evidence = monitor.flagged[0]["evidence"]
    assert evidence["t_statistic"] < -3 and all(v < 0 for v in evidence["affinity_given"].values())
    assert len(monitor.recent_affinity) == 0  # fresh evidence after a decision


def test_harm_rule_ignores_noise_around_zero():
    gen = torch.Generator().manual_seed(1)
    noise = [0.001 * torch.randn(5, 5, generator=gen) for _ in range(10)]
    monitor, model = _monitor_with_window(noise)
    monitor._apply_harm_rule(_fake_trainer(), model)
    assert monitor.flagged == []


@pytest.mark.parametrize("action", ["warn", "downweight", "detach", "stop"])
def test_each_action_does_what_it_says(action):
    monitor, model = _monitor_with_window(_planted_affinities(10), action=action, downweight_factor=0.25)
    trainer = _fake_trainer()
    with pytest.warns(UserWarning, match="task 'random' flagged by rule 'harms_others' at step 7"):
        monitor._apply_harm_rule(trainer, model)
    assert monitor.flagged[0]["action"] == action
    assert model.task_loss_multipliers == ({"random": 0.25} if action == "downweight" else {})
    assert model.detached_tasks == ({"random"} if action == "detach" else set())
    assert trainer.should_stop is (action == "stop")
    # A second rule on the same task is recorded but not acted on twice.
    monitor.val_losses = [{"random": 1.0, "a1": 1.0}, {"random": 1.1, "a1": 0.9}, {"random": 1.2, "a1": 0.8}, {"random": 1.3, "a1": 0.7}]
    with pytest.warns(UserWarning, match="diverging_loss"):
        monitor._apply_divergence_rule(trainer, model)
    assert monitor.flagged[1]["action"] == "none (already acted on)"
    assert model.task_loss_multipliers == ({"random": 0.25} if action == "downweight" else {})


def test_divergence_and_delta_rules():
    monitor, model = _monitor_with_window([], patience=2)
    trainer = _fake_trainer()
    monitor.val_losses = [{"a1": 1.0, "b1": 1.0}, {"a1": 1.1, "b1": 0.9}, {"a1": 1.05, "b1": 0.8}]
    monitor._apply_divergence_rule(trainer, model)
    assert monitor.flagged == []  # a1 did not rise at every validation
    monitor.val_losses.append({"a1": 1.2, "b1": 0.7})
    monitor.val_losses.append({"a1": 1.3, "b1": 0.75})
    with pytest.warns(UserWarning):
        monitor._apply_divergence_rule(trainer, model)
    assert [(f["task"], f["rule"]) for f in monitor.flagged] == [("a1", "diverging_loss")]
    monitor.val_deltas = [{"a1": 1.0, "b1": -2.0}, {"a1": -0.5, "b1": -1.0}]
    with pytest.warns(UserWarning):
        monitor._apply_delta_rule(trainer, model)
    assert [(f["task"], f["rule"]) for f in monitor.flagged][1:] == [("b1", "negative_delta")]


# ---------------------------------------------------------------------------- training
def test_monitor_does_not_change_training_and_writes_heatmaps_and_report(tmp_path):
    def run(with_monitor: bool):
        pl.seed_everything(0)
        dm = PlantedGroupsDataModule(num_train=512, num_val=128)
        model = _planted_model(dm)
        monitor = NegativeTransferMonitor(interval=2, window=3, output_dir=str(tmp_path / "nt"))
        trainer = _trainer(max_epochs=2, callbacks=[monitor] if with_monitor else [])
        trainer.fit(model, dm)
        return model, monitor

    plain, _ = run(False)
    monitored, monitor = run(True)
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), name
    assert monitor.measurements == 4  # 8 steps, every 2
    for name in ("cosine_epoch0.png", "affinity_epoch1.png", "affinity_final.png"):
        assert (tmp_path / "nt" / "heatmaps" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "nt" / "negative_transfer_report.json").read_text())
    assert report["measurements"] == 4 and len(report["affinity"]) == 5
    assert sorted(sum(report["grouping"]["groups"], [])) == sorted(monitor.task_names)
    assert "Average inter-task affinity" in (tmp_path / "nt" / "negative_transfer_report.md").read_text()


def test_state_round_trip():
    monitor, _ = _monitor_with_window(_planted_affinities(4))
    monitor.val_losses = [{"a1": 1.0}]
    clone = NegativeTransferMonitor(window=4)
    clone.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert clone.measurements == 4 and torch.equal(clone.mean_affinity, monitor.mean_affinity)
    assert len(clone.recent_affinity) == 4 and clone.val_losses == [{"a1": 1.0}]
    clone.task_names = ["x", "y"]
    with pytest.raises(ValueError, match="written for tasks"):
        clone.load_state_dict(monitor.state_dict())


@pytest.mark.slow
def test_planted_structure_grouping_recovers_the_two_groups():
    pl.seed_everything(0)
    dm = PlantedGroupsDataModule(num_train=1024)
    monitor = NegativeTransferMonitor(interval=5, window=10)
    _trainer(max_epochs=8, callbacks=[monitor]).fit(_planted_model(dm), dm)
    groups = monitor.report["grouping"]["groups"]
    assert ["a1", "a2"] in groups and ["b1", "b2"] in groups, groups
    Z = monitor.mean_affinity
    assert Z[0, 1] > 0 and Z[2, 3] > 0  # within-group help
    assert Z[0, 2] < 0 and Z[2, 0] < 0  # across-group harm


@pytest.mark.slow
def test_planted_random_label_task_is_flagged_as_harmful():
    """With room to memorise (wide encoder, 256 samples) the random-label task's steps raise every
    other task's loss; it, and no group task, is flagged by ``harms_others``."""
    pl.seed_everything(0)
    dm = PlantedGroupsDataModule(num_train=256)
    tasks = [RegressionTask(n, num_outputs=dm.outputs_per_task) for n in dm.task_names]
    model = MultiTaskModule(MLP(dm.input_dim, (256, 6)), tasks, optimizer=partial(torch.optim.Adam, lr=3e-3))
    monitor = NegativeTransferMonitor(interval=2, window=10)
    _trainer(max_epochs=20, callbacks=[monitor]).fit(model, dm)
    harmful = [f for f in monitor.flagged if f["rule"] == "harms_others"]
    assert [f["task"] for f in harmful] == ["random"], monitor.flagged
    assert all(v < 0 for v in harmful[0]["evidence"]["affinity_given"].values())


@pytest.mark.slow
def test_multidigits_left_right_reports_no_victims():
    pl.seed_everything(0)
    dm = MultiDigitsDataModule(num_train=1024, num_val=256, num_test=64, batch_size=64)
    monitor = NegativeTransferMonitor(interval=4, window=5, patience=2)
    _trainer(max_epochs=3, callbacks=[monitor]).fit(_digits_model(), dm)
    assert monitor.report["flagged"] == []
    assert monitor.measurements == 12
    assert (monitor.mean_affinity[0, 1] > 0) and (monitor.mean_affinity[1, 0] > 0)
    assert monitor.report["grouping"]["groups"] == [["left", "right"]]


class _RankRecorder(NegativeTransferMonitor):
    """Writes each rank's averaged affinity, to check that every rank reached the same numbers."""

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        trainer.strategy.barrier()  # rank 0 has created the folder
        torch.save(self.mean_affinity, os.path.join(self.output_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_same_signals_and_one_report(tmp_path):
    out = str(tmp_path / "nt")
    dm = PlantedGroupsDataModule(num_train=512, num_val=128)
    monitor = _RankRecorder(interval=2, window=3, output_dir=out)
    trainer = _trainer(max_epochs=1, callbacks=[monitor], strategy="ddp_spawn", devices=2)
    trainer.fit(_planted_model(dm), dm)
    files = sorted(os.listdir(out))
    assert files == ["heatmaps", "negative_transfer_report.json", "negative_transfer_report.md", "rank0.pt", "rank1.pt"]
    a, b = torch.load(os.path.join(out, "rank0.pt")), torch.load(os.path.join(out, "rank1.pt"))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert json.loads(open(os.path.join(out, "negative_transfer_report.json")).read())["measurements"] == 1  # 256 samples per rank: 2 steps


@pytest.mark.slow
def test_baselines_command_and_delta_through_the_cli(tmp_path):
    from mtl_lightning.cli import main as cli_main
    from mtl_lightning.monitoring.baselines import main as baselines_main

    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "mtl_lightning.monitoring.NegativeTransferMonitor",
                                   "init_args": {"interval": 2, "window": 2, "baselines_file": "baselines.yaml",
                                                 "output_dir": "nt"}}]},
        "model": {
            "encoder": {"class_path": "mtl_lightning.models.MLP", "init_args": {"in_features": 16, "hidden": [32, 4]}},
            "tasks": [{"class_path": "mtl_lightning.tasks.RegressionTask", "init_args": {"name": n, "num_outputs": 4}}
                      for n in ("a1", "b1")],
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
        "data": {"class_path": "mtl_lightning.data.PlantedGroupsDataModule",
                 "init_args": {"tasks_per_group": 1, "random_task": False, "num_train": 512, "num_val": 128}},
    }
    (tmp_path / "mtl.yaml").write_text(yaml.safe_dump(config))
    baselines_main(["--config", "mtl.yaml", "--out", "baselines.yaml"])
    baselines = yaml.safe_load((tmp_path / "baselines.yaml").read_text())
    assert set(baselines) == {"a1", "b1"} and set(baselines["a1"]) == {"mse", "mae"}
    assert all(v > 0 for m in baselines.values() for v in m.values())
    cli_main(["fit", "--config", "mtl.yaml"])
    report = json.loads((tmp_path / "nt" / "negative_transfer_report.json").read_text())
    assert set(report["final_delta"]) == {"a1", "b1"}
    with pytest.raises(ValueError, match=r"not in the config's model.tasks"):
        from mtl_lightning.monitoring.baselines import single_task_config

        single_task_config(config, "zzz")
