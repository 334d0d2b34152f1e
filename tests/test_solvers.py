"""The Gramian solvers against scipy on hard cases: many active constraints, warm starts, and the
accelerator path (convergence read only after iterations 1, 2, 4, 8, …)."""

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize, nnls

from mtl_lightning.gradients import FairGrad, NashMTL, solvers
from mtl_lightning.gradients.solvers import (
    all_finite, cagrad_simplex_weights, dual_cone_weights, min_norm_simplex, power_balance, warm_start,
)


def conflicting_gramian(t: int, seed: int, p: int = 30) -> np.ndarray:
    """Gradients in opposing pairs plus a few aligned ones: the solutions sit on faces of the simplex."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(t, p))
    jac[1::2] = -0.8 * jac[0::2][: len(jac[1::2])] + 0.4 * rng.normal(size=(len(jac[1::2]), p))
    jac *= rng.uniform(0.1, 10.0, size=(t, 1))  # very different gradient norms
    return jac @ jac.T


def slsqp_simplex(objective, t):
    cons = {"type": "eq", "fun": lambda w: w.sum() - 1}
    return minimize(objective, np.ones(t) / t, bounds=[(0, 1)] * t, constraints=cons, method="SLSQP",
                    options={"ftol": 1e-15, "maxiter": 2000}).x


@pytest.mark.parametrize("t,seed", [(3, 0), (6, 1), (9, 2), (16, 3)])
def test_min_norm_simplex_is_optimal(t, seed):
    m = conflicting_gramian(t, seed)
    w = min_norm_simplex(torch.tensor(m), iterations=4 * t).numpy()
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    ref = slsqp_simplex(lambda x: x @ m @ x, t)
    assert w @ m @ w <= ref @ m @ ref * (1 + 1e-9) + 1e-12
    # KKT: every task with positive weight has the minimal (Mw)_t; the others are not below it.
    grad = m @ w
    level = w @ grad
    scale = np.abs(m).max()
    assert np.all(grad >= level - 1e-8 * scale)
    assert np.all(np.abs(grad[w > 1e-9] - level) <= 1e-8 * scale)


@pytest.mark.parametrize("t,seed,c", [(3, 0, 0.4), (8, 1, 0.5), (12, 2, 0.8)])
def test_cagrad_simplex_weights_minimise_the_official_objective(t, seed, c):
    m = conflicting_gramian(t, seed)
    w = cagrad_simplex_weights(torch.tensor(m), c, iterations=60).numpy()
    mn = m / m.mean()
    objective = lambda x: x @ mn.mean(1) + c * np.sqrt(x @ mn @ x + 1e-8)
    ref = slsqp_simplex(objective, t)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    assert objective(w) <= objective(ref) + 1e-9


@pytest.mark.parametrize("t,seed", [(2, 0), (2, 1), (2, 2), (4, 0), (9, 1), (16, 2)])
def test_dual_cone_weights_match_nnls(t, seed):
    m = conflicting_gramian(t, seed)
    m = m / np.trace(m) + 1e-4 * np.eye(t)
    v = dual_cone_weights(torch.tensor(m), iterations=4 * t).numpy()
    # Independent: v_i − e_i = argmin_{u ≥ 0} ‖L(e_i + u)‖² with LᵀL = M, by scipy's NNLS.
    factor = np.linalg.cholesky(m).T
    for i in range(t):
        u, _ = nnls(factor, -factor[:, i])
        np.testing.assert_allclose(v[i], np.eye(t)[i] + u, atol=1e-8)



@pytest.mark.parametrize("jac,expected", [
    ([[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]),  # no conflict: each row stays e_i
    ([[1.0, 0.0], [-1.0, 1.0]], [[1.0, 0.5], [1.0, 1.0]]),  # v_0 = e_0 + ½e_1, v_1 = e_1 + e_0
    ([[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]),  # a zero gradient is never projected onto
    ([[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]),
])
def test_dual_cone_weights_pair_by_hand(jac, expected):
    jac = torch.tensor(jac, dtype=torch.float64)
    np.testing.assert_allclose(dual_cone_weights(jac @ jac.T).numpy(), expected, atol=1e-12)

@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_power_balance_matches_least_squares(power):
    m = conflicting_gramian(6, 4)
    m = m / np.linalg.norm(m)
    w = power_balance(torch.tensor(m), power, torch.full((6,), 1 / 6, dtype=torch.float64)).numpy()
    ref = least_squares(lambda x: m @ x - x ** (-1 / power), np.ones(6) / 6, bounds=(0, np.inf),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    np.testing.assert_allclose(m @ w, w ** (-1 / power), rtol=1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-6)


@pytest.mark.parametrize("cosine", [0.9, 0.0, -0.6, -0.999])
def test_power_balance_pair_closed_form_solves_the_bargaining_condition(cosine):
    """T = 2, power 1 (Nash-MTL) is solved in closed form: it must satisfy Mα = 1/α and agree with
    scipy on the same equations, down to nearly opposite gradients."""
    g1 = np.array([2.0, 0.0])
    g2 = 0.3 * np.array([cosine, np.sqrt(1 - cosine**2)])
    jac = np.stack([g1, g2])
    m = jac @ jac.T
    w = power_balance(torch.tensor(m), 1.0, torch.ones(2, dtype=torch.float64)).numpy()
    ref = least_squares(lambda x: m @ x - 1 / x, np.ones(2), bounds=(0, np.inf), xtol=1e-15, ftol=1e-15,
                        gtol=1e-15, x_scale="jac").x
    np.testing.assert_allclose(m @ w, 1 / w, rtol=1e-10)
    np.testing.assert_allclose(w, ref, rtol=1e-6)


@pytest.mark.parametrize("t", [2, 3])
def test_power_balance_without_positive_solution_stays_finite_and_gives_no_update(t):
    """Exactly opposite gradients (a Pareto-stationary pair): Mw = w^(−1/p) has no positive solution.
    The solver used to raise mid-training (a singular Newton system); now the iterates grow along
    the direction where Jᵀw = 0 and stop, so Nash-MTL and FairGrad return finite positive weights
    whose update has no component along the opposite pair."""
    jac = np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])[:t]
    m = torch.tensor(jac @ jac.T)
    for power in (1.0, 2.0):
        w = power_balance(m, power, torch.ones(t, dtype=torch.float64), 30)
        assert torch.isfinite(w).all() and (w > 0).all()
    for method in (NashMTL(max_norm=0.0), NashMTL(), FairGrad()):
        w = method.weights(m, torch.ones(t)).numpy()
        assert np.isfinite(w).all() and (w > 0).all(), type(method).__name__
        d = w @ jac
        assert abs(d[0]) <= 1e-6 * np.abs(w[:2] * np.linalg.norm(jac[:2], axis=1)).max()


@pytest.mark.parametrize("t", [2, 3])
def test_power_balance_returns_its_start_where_the_iterates_are_not_finite(t):
    """A non-finite Gramian (an fp16 overflow step) must leave the caller's weights as they were."""
    m = torch.full((t, t), float("nan"), dtype=torch.float64)
    init = torch.linspace(0.5, 1.5, t, dtype=torch.float64)
    for power in (1.0, 2.0):
        assert torch.equal(power_balance(m, power, init, 10), init)


def test_warm_start_changes_iterations_not_the_answer():
    m1 = torch.tensor(conflicting_gramian(8, 5))
    m2 = m1 + 0.05 * torch.tensor(conflicting_gramian(8, 6))  # the next step's Gramian
    cold = min_norm_simplex(m2, 64)
    warm = min_norm_simplex(m2, 64, start=min_norm_simplex(m1, 64))
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-10)
    cold_v = dual_cone_weights(m2 / m2.trace(), 64)
    warm_v = dual_cone_weights(m2 / m2.trace(), 64, start=dual_cone_weights(m1 / m1.trace(), 64))
    torch.testing.assert_close(warm_v, cold_v, rtol=0, atol=1e-10)


def test_newton_solvers_warm_and_cold_agree():
    """The Newton solvers stop after a full step from a small decrement (CAGrad: ‖d‖ < √tol; Nash-MTL
    and FairGrad: decrement < √tol, with no line search near the solution): from the previous
    step's solution they take fewer iterations and land on the cold-start answer."""
    m1 = torch.tensor(conflicting_gramian(8, 5))
    m2 = m1 + 0.05 * torch.tensor(conflicting_gramian(8, 6))
    cold = cagrad_simplex_weights(m2, 0.4, 64)
    warm = cagrad_simplex_weights(m2, 0.4, 64, start=cagrad_simplex_weights(m1, 0.4, 64))
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-8)
    n1, n2 = m1 / torch.linalg.matrix_norm(m1), m2 / torch.linalg.matrix_norm(m2)
    ones = torch.ones(8, dtype=torch.float64)
    for power in (1.0, 2.0):
        cold = power_balance(n2, power, ones, 60)
        warm = power_balance(n2, power, power_balance(n1, power, ones, 60), 60)
        torch.testing.assert_close(warm, cold, rtol=1e-9, atol=0)
        torch.testing.assert_close(n2 @ cold, cold.pow(-1 / power), rtol=1e-9, atol=0)


def test_unusable_warm_starts_fall_back_to_the_default():
    default = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.equal(warm_start(torch.tensor([float("nan"), 0.5, 0.5]), default), default)
    assert torch.equal(warm_start(torch.ones(4), default), default)
    assert torch.equal(warm_start(None, default), default)
    previous = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.equal(warm_start(previous, default), previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, info.max, -info.max, info.tiny, info.tiny / 4, float("inf"), float("-inf"), float("nan")]
    for value in values:
        for others in ([], [1.0, -2.0]):
            x = torch.tensor([*others, value], dtype=dtype)
            assert bool(all_finite(x)) == bool(torch.isfinite(x).all()), (dtype, value)


def _solve_all(m: torch.Tensor) -> list[torch.Tensor]:
    return [min_norm_simplex(m, 40), cagrad_simplex_weights(m, 0.5, 40), dual_cone_weights(m / m.trace(), 40),
            power_balance(m / torch.linalg.matrix_norm(m), 1.0, torch.ones(7, dtype=torch.float64), 40),
            power_balance(m / torch.linalg.matrix_norm(m), 2.0, torch.ones(7, dtype=torch.float64), 40)]


def _record_stops(monkeypatch, original) -> list[int]:
    """The iteration after which each solver call stopped (its budget, 40, if it never did)."""
    stops: list[int] = []

    def recording(flag, iteration):
        done = original(flag, iteration)
        if done or iteration == 39:
            stops.append(iteration if done else 40)
        return done

    monkeypatch.setattr(solvers, "converged", recording)
    return stops


def test_accelerator_path_reads_convergence_at_powers_of_two_and_gives_the_same_answers(monkeypatch):
    """Where reading a value synchronises with the host (accelerators) the solvers test convergence
    only after iterations 1, 2, 4, 8, …: they stop at the first such test after convergence (not
    after the whole budget) and land on the answers of the CPU path."""
    m = torch.tensor(conflicting_gramian(7, 7))
    converged = solvers.converged
    cpu_stops = _record_stops(monkeypatch, converged)
    expected = _solve_all(m)
    monkeypatch.setattr(solvers, "reading_is_free", lambda flag: False)
    accelerator_stops = _record_stops(monkeypatch, converged)
    got = _solve_all(m)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    assert len(cpu_stops) == len(accelerator_stops) == 5 and max(cpu_stops) < 39
    for cpu, accelerator in zip(cpu_stops, accelerator_stops):
        # The first iteration i ≥ cpu with i + 1 a power of two (so i + 1 < 2(cpu + 1)).
        assert accelerator == (1 << cpu.bit_length()) - 1, (cpu, accelerator)
