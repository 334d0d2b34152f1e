"""NegativeTransferMonitor: signals against hand computations and torch's optimizers, rules,
actions, reporting, planted structure, MultiDigits, DDP and the baselines command."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import warnings
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
from mtl_lightning.monitoring.report import HeatmapWriter
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


@pytest.mark.parametrize("reference", ["zero_gradient", "current"])
def test_affinity_against_real_optimizer_steps(reference):
    """Z_{i→j} from ``measure`` equals 1 - L_j(θ_i)/L_j(θ_ref), with θ_i the parameters after a real
    Adam step on task i's shared-parameter gradient alone (heads untouched), and θ_ref the real
    Adam step on a zero gradient (``zero_gradient``: momentum only) or θ itself (``current``)."""
    torch.manual_seed(0)
    dm = PlantedGroupsDataModule(num_train=64, num_val=8, num_test=8, batch_size=64)
    dm.setup()
    model = _planted_model(dm)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = next(iter(dm.train_dataloader()))
    monitor = NegativeTransferMonitor(affinity_reference=reference)
    _setup(monitor, model)
    shared = list(model.encoder.parameters())

    def losses(m):
        with torch.no_grad():
            return torch.stack(list(m.compute_losses(batch, "monitor")[2].values()))

    for _ in range(3):  # momentum and second-moment state
        optimizer.zero_grad()
        sum(model.compute_losses(batch)[2].values()).backward()
        optimizer.step()

    def stepped_losses(grads):
        m, opt = copy.deepcopy((model, optimizer))  # one deepcopy: the optimizer keeps pointing at m's parameters
        opt.zero_grad(set_to_none=True)
        for p, g in zip(m.encoder.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        return losses(m)

    task_losses = list(model.compute_losses(batch, "monitor")[2].values())
    task_grads = [torch.autograd.grad(l, shared, retain_graph=True) for l in task_losses]
    reference_losses = stepped_losses([torch.zeros_like(p) for p in shared]) if reference == "zero_gradient" else losses(model)
    expected = torch.stack([1 - stepped_losses(g) / reference_losses for g in task_grads]).double()
    trainer = SimpleNamespace(optimizers=[optimizer], world_size=1,
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    state = copy.deepcopy(optimizer.state_dict())
    signals = monitor.measure(trainer, model, batch)
    assert torch.allclose(signals["affinity"], expected, atol=1e-6, rtol=1e-4)
    assert repr(optimizer.state_dict()) == repr(state)
    if reference == "zero_gradient":  # Adam's momentum moves every task's loss: the references differ
        assert not torch.allclose(reference_losses, losses(model), rtol=1e-4)


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


def test_heatmap_writer_reuses_its_figure(tmp_path):
    pytest.importorskip("matplotlib")
    writer = HeatmapWriter()
    m = torch.tensor([[1.0, float("nan")], [-0.5, 0.2]])
    paths = [writer.save(m * (k + 1), ["x", "y"], f"title {k}", str(tmp_path / f"h{k}.png"), "j", "i") for k in range(2)]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert len(writer._figures) == 1  # same tasks and labels: one figure, updated
    entry = next(iter(writer._figures.values()))
    assert entry["title"].get_text() == "title 1" and entry["texts"][0][1].get_text() == "–"
    assert entry["texts"][1][0].get_text() == "-1" and entry["image"].get_clim() == (-2.0, 2.0)
    with pytest.raises(ValueError, match="matrix of shape"):
        writer.save(torch.zeros(3, 3), ["x", "y"], "t", str(tmp_path / "bad.png"), "j", "i")
    assert pickle.loads(pickle.dumps(writer))._figures == {}  # figures stay behind (ddp_spawn pickles callbacks)


# ---------------------------------------------------------------------------- options and baselines
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(action="explode"), "action must be one of"),
        (dict(interval=0), "interval must be an integer >= 1"),
        (dict(window=0), "window must be"),
        (dict(downweight_factor=1.5), "downweight_factor"),
        (dict(max_networks=0), "max_networks"),
        (dict(affinity_reference="theta"), "affinity_reference must be one of"),
        (dict(harm_min_fraction=-0.1), "harm_min_fraction must be >= 0"),
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
    kwargs.setdefault("window", max(len(matrices), 1))
    monitor = NegativeTransferMonitor(**kwargs)
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
    assert evidence["least_hurt_t_statistic"] == max(evidence["t_statistic"].values()) < -3
    assert all(v < 0 for v in evidence["affinity_given"].values())
    assert len(monitor.recent_affinity) == 0 and float(monitor.harm_count.max()) == 0  # fresh evidence after a decision


def test_harm_rule_needs_each_target_hurt_significantly():
    """a1 hurts the other group strongly and its partner a2 not significantly (window mean slightly
    negative, t ≈ -0.5): the mean over its targets is very significant, but it does not hurt every
    task, so it is not flagged; the random task, which hurts each task significantly, is."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(10, 5, 5, generator=gen)
    noise = (noise - noise.mean(0)) / noise.std(0)  # exactly mean 0, std 1 per entry over the window
    mean = torch.full((5, 5), -0.02)  # across groups: strong harm
    mean[0, 1] = mean[1, 0] = mean[2, 3] = mean[3, 2] = 0.01
    mean[0, 1] = -0.0005  # a1 -> a2: noisy around zero
    mean[4, :4] = -0.004
    scale = torch.full((5, 5), 0.001)
    scale[0, 1] = 0.003
    matrices = list(mean + scale * noise)  # t(a1 -> a2) = -0.0005 / (0.003 / sqrt(10)) ≈ -0.53
    monitor, model = _monitor_with_window(matrices)
    stats = monitor.harm_statistics()
    assert float(stats["t_stat"][0, 1]) == pytest.approx(-0.0005 / (0.003 / 10**0.5), rel=1e-4)
    assert float(stats["least_hurt_t"][0]) == pytest.approx(float(stats["t_stat"][0, 1]))
    with pytest.warns(UserWarning, match="task 'random' flagged"):
        monitor._apply_harm_rule(_fake_trainer(), model)
    assert [f["task"] for f in monitor.flagged] == ["random"]


@pytest.mark.parametrize("fraction, flagged", [(0.5, []), (0.1, ["random"])])
def test_harm_rule_needs_material_harm(fraction, flagged):
    """Every task's own step lowers its loss by 2% (diagonal), the random task's step raises the
    others' by 0.4%, very significantly: it undoes 20% of their own progress, under the 50% default."""
    matrices = [m + torch.diag(torch.full((5,), 0.022)) for m in _planted_affinities(10)]
    monitor, model = _monitor_with_window(matrices, harm_min_fraction=fraction)
    assert float(monitor.harm_statistics()["least_hurt_t"][4]) < -3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor._apply_harm_rule(_fake_trainer(), model)
    assert [f["task"] for f in monitor.flagged] == flagged
    if flagged:
        undone = monitor.flagged[0]["evidence"]["fraction_of_own_progress_undone"]
        assert all(0.15 < v < 0.25 for v in undone.values())


def test_harm_rule_accumulates_persistent_weak_harm_since_the_last_decision():
    """The random task hurts every task by 0.001 per measurement with noise 0.002: no window of 10
    is significant, the 40 measurements since the start are (t = -0.001 / (0.002 / sqrt(40)) ≈ -3.16)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 5, 5, generator=gen)
    noise = (noise - noise.mean(0)) / noise.std(0)
    mean = torch.full((5, 5), -0.002)
    mean[0, 1] = mean[1, 0] = mean[2, 3] = mean[3, 2] = 0.01
    mean[4, :4] = -0.001
    monitor, model = _monitor_with_window([], window=10)
    for m in mean + 0.002 * noise:
        monitor._record({"losses": torch.ones(5), "affinity": m.double(), "cosine": torch.zeros(5, 5, dtype=torch.float64),
                         "gms": torch.ones(5, 5, dtype=torch.float64), "norms": torch.ones(5, dtype=torch.float64)})
    assert float(monitor.harm_statistics("window")["least_hurt_t"][4]) > -3
    since = monitor.harm_statistics("since_decision")
    assert float(since["least_hurt_t"][4]) == pytest.approx(-0.001 / (0.002 / 40**0.5), rel=1e-6)
    with pytest.warns(UserWarning, match="task 'random' flagged"):
        monitor._apply_harm_rule(_fake_trainer(), model)
    assert [(f["task"], f["evidence"]["span"], f["evidence"]["measurements"]) for f in monitor.flagged] == [("random", "since_decision", 40)]
    with pytest.raises(ValueError, match="span must be"):
        monitor.harm_statistics("all")


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
        monitor = NegativeTransferMonitor(interval=2, window=3, output_dir=str(tmp_path / "nt"), plot_every_n_epochs=1)
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
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planted_structure_random_task_flagged_and_groups_recovered(seed):
    """One setting (docs/benchmarks/monitor.md, "Planted-structure benchmark"): the random-target task,
    and no other, is flagged by ``harms_others``, and the recommended networks are the two planted
    groups (the random task alone). Seeds 1-3 here; the benchmark page reports the rate over seeds
    0-19 (18/20) and names the two misses (seeds 0 and 11)."""
    pl.seed_everything(seed)
    dm = PlantedGroupsDataModule(num_train=1024, seed=seed)
    monitor = NegativeTransferMonitor(interval=5, window=10)
    _trainer(max_epochs=30, callbacks=[monitor]).fit(_planted_model(dm), dm)
    harmful = [f for f in monitor.flagged if f["rule"] == "harms_others"]
    assert [f["task"] for f in harmful] == ["random"], monitor.flagged
    assert all(t < -3 for t in harmful[0]["evidence"]["t_statistic"].values())
    assert monitor.report["grouping"]["groups"] == [["a1", "a2"], ["b1", "b2"], ["random"]]
    Z = monitor.mean_affinity
    assert min(Z[0, 1], Z[1, 0], Z[2, 3], Z[3, 2]) > 0  # within a group: help
    assert Z[:2, 2:4].max() < 0 and Z[2:4, :2].max() < 0  # across groups: harm
    assert Z[4, :4].max() < 0  # the random task hurts every other task on average


@pytest.mark.slow
def test_multidigits_left_right_reports_no_victims():
    pl.seed_everything(0)
    dm = MultiDigitsDataModule(num_train=1024, num_val=256, num_test=64, batch_size=64)
    monitor = NegativeTransferMonitor(interval=4, window=5, patience=2)
    _trainer(max_epochs=3, callbacks=[monitor]).fit(_digits_model(), dm)
    assert monitor.report["flagged"] == []
    assert monitor.measurements == 12
    # The two digits' gradients barely affect each other: each task's step changes the other's loss
    # by less than a quarter of what that task's own step achieves.
    Z = monitor.mean_affinity
    assert Z[0, 0] > 0 and Z[1, 1] > 0
    assert abs(Z[0, 1]) < 0.25 * Z[1, 1] and abs(Z[1, 0]) < 0.25 * Z[0, 0]


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
