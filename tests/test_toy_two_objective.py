"""The two-objective toy: problem definition, runners through the real callbacks, plot command."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_lightning.balancing import FAMO, EqualWeighting
from mtl_lightning.registry import gradient_methods
from mtl_lightning.toy import two_objective as toy


pytestmark = pytest.mark.one_thread


def test_losses_match_the_reference_formulas_by_hand():
    # x2 = 0: c1 = c2 = 0, both losses vanish.
    l1, l2 = toy.two_objective_losses(torch.tensor([1.0, 0.0]))
    assert float(l1) == 0.0 and float(l2) == 0.0
    # x = (0, 2): c1 = tanh(1), c2 = 0; f1 = log|−3.5 + tanh 2| + 6, f2 = log|1.5 − tanh 2 + 2| + 6.
    l1, l2 = toy.two_objective_losses(torch.tensor([0.0, 2.0]))
    t = math.tanh(2.0)
    assert float(l1) == pytest.approx(math.tanh(1.0) * (math.log(abs(-3.5 + t)) + 6), rel=1e-6)
    assert float(l2) == pytest.approx(math.tanh(1.0) * (math.log(abs(1.5 - t + 2)) + 6), rel=1e-6)
    # x = (7, −8): c2 = tanh 4, f1_sq = −20 (its minimum), f2_sq = 14²/10 − 20.
    l1, l2 = toy.two_objective_losses(torch.tensor([7.0, -8.0]))
    assert float(l1) == pytest.approx(math.tanh(4.0) * -20.0, rel=1e-6)
    assert float(l2) == pytest.approx(math.tanh(4.0) * (19.6 - 20.0), rel=1e-5)


def test_direct_runner_matches_lightning_trainer_exactly():
    for method in ("ew", "famo"):
        direct = toy.run_method(method, (9.0, 9.0), 25, lr=0.01)
        fitted = toy.run_method(method, (9.0, 9.0), 25, lr=0.01, runner="lightning")
        assert direct.shape == (26, 2)
        assert torch.equal(direct, fitted)


def test_famo_balances_where_equal_weighting_favours_the_large_loss():
    # L1 is scaled by 0.1, so EW follows L2 towards its minimum at x1 = −7; FAMO stays central.
    famo_options = toy.TOY_METHOD_OPTIONS["FAMO"]
    ew = toy.run_method(EqualWeighting(), (-8.5, 7.5), 1000, lr=0.03)
    famo = toy.run_method(FAMO(**famo_options), (-8.5, 7.5), 1000, lr=0.03)
    assert ew[-1, 0] < -5 and abs(float(famo[-1, 0])) < 3
    famo = toy.run_method(FAMO(**famo_options), (9.0, 9.0), 1000, lr=0.03)
    assert famo[-1, 1] < -6.5 and abs(float(famo[-1, 0])) < 3  # descending onto x2 ≈ −8.36


def test_resolve_method_by_short_name_or_path_and_errors():
    assert toy.resolve_method("FaMo") is FAMO
    assert toy.resolve_method("mtl_lightning.balancing.EqualWeighting") is EqualWeighting
    with pytest.raises(ValueError, match="Unknown balancing method 'nope'"):
        toy.resolve_method("nope")
    with pytest.raises(ValueError, match="not a BalancingMethod"):
        toy.resolve_method("torch.nn.Linear")
    with pytest.raises(ValueError, match="runner"):
        toy.run_method("ew", (0.0, 0.0), 1, runner="fast")


def test_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "toy.png"
    trajectories = toy.main(["--methods", "ew,dwa", "--steps", "20", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(trajectories) == {"EqualWeighting", "DWA"} and len(trajectories["DWA"]) == len(toy.PAPER_STARTS)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    runs = {"EW": [torch.zeros(3, 2)]}
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install 'mtl-lightning\[plots\]'"):
        toy.plot_trajectories(runs, str(tmp_path / "x.png"))


# ------------------------------------------------------------------------------- gradient methods
GRADIENT_METHODS = tuple(gradient_methods())  # every registered gradient method


def test_pareto_front_solves_the_stationarity_condition_and_matches_the_papers_line():
    x1 = torch.linspace(-7, 7, 29, dtype=torch.float64)
    x2 = toy.pareto_front(x1)
    assert float(toy.pareto_front(torch.tensor(0.0))) == pytest.approx(-8.3552, abs=1e-4)  # CAGrad's plot line
    assert float(x2.min()) == pytest.approx(-8.4345, abs=1e-4) and float(x2.max()) <= -8.355
    # On the front the two gradients are opposite: λ∇L1 + (1−λ)∇L2 = 0 with λ = (x1 + 7)/14.
    inner = torch.stack([x1, x2], 1)[1:-1]
    assert float(toy.pareto_gap(inner).max()) < 1e-6
    x = inner.clone().requires_grad_(True)
    l1, l2 = toy.two_objective_losses(x)
    (g1,) = torch.autograd.grad(l1.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(l2.sum(), x)
    lam = ((inner[:, 0] + 7) / 14).unsqueeze(1)
    torch.testing.assert_close(lam * g1 + (1 - lam) * g2, torch.zeros_like(g1), atol=1e-9, rtol=0)


def test_on_pareto_set_needs_both_closeness_and_opposite_gradients():
    on = toy.on_pareto_set(torch.tensor([
        [0.0, -8.3552], [-5.73, -8.40], [3.0, -8.33],  # on it (within 0.05)
        [0.0, -8.0], [7.5, -8.43], [-5.7, -5.6], [5.0, 1.7],  # above it, beyond x1 = 7, EW's stalls
    ]))
    assert on.tolist() == [True, True, True, False, False, False, False]
    # Far from the front the gradients can still be nearly opposite (x2 barely matters below 0):
    # closeness is the discriminating part, the gap rules out x1 beyond ±7 and the upper region.
    assert float(toy.pareto_gap(torch.tensor([0.0, -8.0]))) < 0.01
    assert float(toy.pareto_gap(torch.tensor([5.0, 1.7]))) > 0.5


def test_gradient_method_names_resolve_with_or_without_underscores():
    from mtl_lightning.gradients import AlignedMTL, DBMTL, IMTLG, NashMTL

    assert toy.resolve_method("nash_mtl") is NashMTL and toy.resolve_method("NashMTL") is NashMTL
    assert toy.resolve_method("nash-mtl") is NashMTL and toy.resolve_method("imtl_g") is IMTLG
    assert toy.resolve_method("aligned_mtl") is AlignedMTL and toy.resolve_method("db_mtl") is DBMTL


def test_toy_builds_gradient_methods_in_param_mode_with_the_papers_toy_settings():
    cagrad, nash, graddrop = toy.build_method("cagrad"), toy.build_method("nash_mtl"), toy.build_method("graddrop")
    assert cagrad.mode == "param" and cagrad.c == 0.5  # CAGrad's toy.py; the method's default is 0.4
    assert nash.mode == "param" and (nash.max_norm, nash.iterations, nash.update_every) == (1.0, 20, 1)
    assert graddrop.mode == "rep"  # rep mode only: z = x, a batch of one sample
    for name in GRADIENT_METHODS:
        method = toy.build_method(name)
        assert method.mode == ("param" if "param" in type(method).supported_modes else "rep")


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_every_gradient_method_moves_the_point_finitely(name):
    run = toy.run_method(name, (-7.5, -0.5), 30, lr=0.01)
    assert run.shape == (31, 2) and torch.isfinite(run).all()
    assert float((run[-1] - run[0]).norm()) > 0.05  # Adam moves ≈ lr a step while the sign holds
    # Every one of them descends the scaled sum here (both objectives fall from this start).
    l1, l2 = toy.two_objective_losses(run[[0, -1]])
    assert float(0.1 * l1[1] + l2[1]) < float(0.1 * l1[0] + l2[0])


def test_gradient_method_through_the_lightning_trainer_matches_the_direct_runner():
    for name in ("nash_mtl", "graddrop"):
        direct = toy.run_method(name, (9.0, -1.0), 15, lr=0.01)
        fitted = toy.run_method(name, (9.0, -1.0), 15, lr=0.01, runner="lightning")
        assert torch.equal(direct, fitted)


def test_graddrop_on_the_toy_uses_one_sample_and_is_stuck_where_x_is_zero():
    # GradDrop's mask multiplies the representation gradients by sign(z): at z = x = (0, 0) every
    # mask is 0 and the point never moves (its sign(z) factor is meant for activations).
    run = toy.run_method("graddrop", (0.0, 0.0), 10, lr=0.01)
    assert torch.equal(run[-1], run[0])


def test_db_mtl_sees_positive_shifted_losses_on_the_toy():
    # DB-MTL uses ∇log L_t: the toy's negative losses are shifted by 21 × scale (FAMO's toy bound).
    from mtl_lightning.gradients import DBMTL

    seen = []

    class Spy(DBMTL):
        def aggregate(self, jacobian, gramian, losses, scale, ctx):
            seen.append(losses.clone())
            return super().aggregate(jacobian, gramian, losses, scale, ctx)

    toy.TOY_SHIFTED_LOSSES += ("Spy",)
    try:
        toy.run_method(Spy(), (0.0, -8.0), 3, lr=0.01)
    finally:
        toy.TOY_SHIFTED_LOSSES = toy.TOY_SHIFTED_LOSSES[:-1]
    l1, l2 = toy.two_objective_losses(torch.tensor([0.0, -8.0]))
    assert float(l1) < 0 and float(l2) < 0
    torch.testing.assert_close(seen[0], torch.stack([0.1 * l1 + 2.1, l2 + 21.0]).float())
    assert (torch.stack(seen) > 0).all()


# The papers' claim on a shortened schedule: Adam at lr 1e-2 (the papers: lr 1e-3 for 35k-100k
# steps; the README reports that setting, measured). Measured at lr 1e-2: Nash-MTL settles on the set
# within 2k steps from every start. CAGrad stays close to the average gradient, whose step shrinks in
# the flat valley below x2 = -5 as EW's does (Adam's second moment remembers the steep part for
# thousands of steps): it settles after 1.3k-7.6k steps from five starts; from (9, 9) it first spends
# 3.4k steps in the valley above x2 = 0 and is still descending after 14k (too long for CI: the
# README reports (9, 9) on the papers' schedule).
REACH_STEPS = {"nash_mtl": 2500, "cagrad": 8000}
BELOW_THE_VALLEY = [s for s in toy.STARTS["all"] if s != (9.0, 9.0)]


@pytest.mark.slow
@pytest.mark.parametrize("start", toy.STARTS["all"], ids=lambda s: f"({s[0]:g},{s[1]:g})")
def test_nash_mtl_reaches_the_pareto_set_from_every_paper_start(start):
    end = toy.run_method("nash_mtl", start, REACH_STEPS["nash_mtl"], lr=0.01)[-1]
    assert bool(toy.on_pareto_set(end)), (start, end.tolist(), float(toy.pareto_distance(end)))
    assert float(toy.pareto_gap(end)) < 0.01  # gradients at more than 178.8°


@pytest.mark.slow
@pytest.mark.parametrize("start", BELOW_THE_VALLEY, ids=lambda s: f"({s[0]:g},{s[1]:g})")
def test_cagrad_reaches_the_pareto_set_from_the_paper_starts(start):
    end = toy.run_method("cagrad", start, REACH_STEPS["cagrad"], lr=0.01)[-1]
    assert bool(toy.on_pareto_set(end)), (start, end.tolist(), float(toy.pareto_distance(end)))
    assert float(toy.pareto_gap(end)) < 0.01
    # Near the average loss minimum: CAGrad (c < 1) converges to a stationary point of the mean
    # loss, here 0.1·L1 + L2, minimised at x1 = -6.3/1.1 = -5.727 on the front.
    assert float(end[0]) == pytest.approx(-6.3 / 1.1, abs=0.05)


@pytest.mark.slow
def test_equal_weighting_does_not_reach_the_pareto_set_from_9_9_on_the_same_schedule():
    # The discriminating case: on the schedule where Nash-MTL reaches the set from every start, EW
    # from (9, 9) sits in the valley of the log terms above x2 = 0 (after the papers' 35k steps at
    # lr 1e-3 it is still there, at (5.0, 4.0); at lr 1e-2 it is at (5.0, 1.7) after 3.5k steps and
    # has left it, at x2 = -2.3, after 8k).
    end = toy.run_method("ew", (9.0, 9.0), REACH_STEPS["nash_mtl"], lr=0.01)[-1]
    assert not bool(toy.on_pareto_set(end)) and float(end[1]) > 0
    assert float(toy.pareto_distance(end)) > 5
