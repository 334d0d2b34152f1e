"""Each gradient method vs hand-computed / closed-form cases and an independent slow reference.

References use numpy loops and scipy (SLSQP, nnls, least_squares) on the Jacobian itself, never the
library's Gramian formulations or solvers.
"""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize, nnls

from mtl_lightning.gradients import (
    CAGrad, ConFIG, DBMTL, DualProj, FairGrad, GradDrop, GradVac, IMTLG, MGDA, AlignedMTL, NashMTL, PCGrad, SDMGrad,
    UPGrad,
)
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.registry import gradient_methods


def direction(method, jac, losses=None):
    """The aggregated direction d = Jᵀw of a Gramian weighting method (float64)."""
    jac = torch.tensor(np.asarray(jac), dtype=torch.float64)  # a copy: aggregate may work in place
    losses = torch.ones(jac.shape[0], dtype=torch.float64) if losses is None else torch.as_tensor(losses)
    (d,), _ = method.aggregate([jac], jac @ jac.T, losses, None, None)
    return d.numpy()


def random_jacobian(t, p=7, seed=0, conflict=True):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(t, p))
    if conflict:
        jac[1] = -0.7 * jac[0] + 0.3 * rng.normal(size=p)
    return jac


# ------------------------------------------------------------------------------------------- MGDA
def test_mgda_two_tasks_closed_form():
    g1, g2 = np.array([2.0, 0.0, 1.0]), np.array([-1.0, 1.0, 0.5])
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    np.testing.assert_allclose(direction(MGDA(), [g1, g2]), gamma * g1 + (1 - gamma) * g2, atol=1e-10)
    np.testing.assert_allclose(direction(MGDA(), [[1.0, 0.0], [0.0, 1.0]]), [0.5, 0.5], atol=1e-10)  # orthogonal
    np.testing.assert_allclose(direction(MGDA(), [[1.0, 0.0], [-1.0, 0.0]]), [0.0, 0.0], atol=1e-10)  # opposite


@pytest.mark.parametrize("t", [3, 5])
def test_mgda_matches_slsqp_min_norm(t):
    jac = random_jacobian(t, p=12, seed=t)
    cons = {"type": "eq", "fun": lambda w: w.sum() - 1}
    ref = minimize(lambda w: np.sum((w @ jac) ** 2), np.ones(t) / t, bounds=[(0, 1)] * t, constraints=cons,
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000}).x
    d = direction(MGDA(), jac)
    assert np.sum(d**2) <= np.sum((ref @ jac) ** 2) + 1e-6
    np.testing.assert_allclose(d, ref @ jac, atol=2e-3)


def test_mgda_l2_normalization_uses_unit_gradients():
    jac = np.array([[10.0, 0.0], [0.0, 1.0]])
    w = MGDA(normalization="l2").weights(torch.tensor(jac @ jac.T), torch.ones(2))
    np.testing.assert_allclose(w.numpy(), [0.5, 0.5], atol=1e-9)  # min-norm of the unit vectors


# ------------------------------------------------------------------------------------------ PCGrad
def pcgrad_reference(jac, orders):
    pc = jac.copy()
    for i in range(len(jac)):
        for j in orders[i]:
            dot = pc[i] @ jac[j]
            if dot < 0:
                pc[i] = pc[i] - dot / (jac[j] @ jac[j]) * jac[j]
    return pc.sum(0)


def test_pcgrad_conflicting_pair_by_hand():
    # g1·g2 = −1: g1 → g1 + ½g2 = (0.5, 0.5), g2 → g2 + g1 = (0, 1); sum (0.5, 1.5)
    np.testing.assert_allclose(direction(PCGrad(), [[1.0, 0.0], [-1.0, 1.0]]), [0.5, 1.5], atol=1e-12)
    np.testing.assert_allclose(direction(PCGrad(), [[1.0, 0.0], [0.0, 1.0]]), [1.0, 1.0], atol=1e-12)


def test_pcgrad_general_case_matches_vector_reference():
    jac = random_jacobian(5, p=9, seed=1)
    method = PCGrad(seed=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # successive steps draw new orders from the same checkpointed stream
        orders = torch.argsort(torch.rand((5, 5), generator=gen), dim=1).numpy()
        np.testing.assert_allclose(direction(method, jac), pcgrad_reference(jac, orders), atol=1e-10)


# ----------------------------------------------------------------------------------------- GradVac
def gradvac_reference(jac, orders, targets, beta):
    pc = jac.copy()
    for i in range(len(jac)):
        for j in orders[i]:
            gi, gj = pc[i], jac[j]
            norms = np.linalg.norm(gi) * np.linalg.norm(gj)
            cos = gi @ gj / norms if norms > 0 else 0.0
            tgt = targets[i, j]
            if cos < tgt and np.linalg.norm(gj) > 0:  # a zero gradient cannot be vaccinated against
                w = np.linalg.norm(gi) * (tgt * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - tgt**2)) / (
                    np.linalg.norm(gj) * np.sqrt(1 - tgt**2))
                pc[i] = gi + w * gj
            targets[i, j] = (1 - beta) * tgt + beta * cos
    return pc.sum(0)


def test_gradvac_pair_reaches_target_similarity():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    method = GradVac()
    d = direction(method, [g1, g2])
    # With targets 0 each projected gradient becomes orthogonal to the other task's gradient.
    g1_new, g2_new = np.array([0.5, 0.5]), np.array([0.0, 1.0])
    np.testing.assert_allclose(d, g1_new + g2_new, atol=1e-12)
    cos = -1 / np.sqrt(2)
    np.testing.assert_allclose(method.targets.numpy(), 0.5 * cos * (1 - np.eye(2)), atol=1e-12)


def test_gradvac_general_case_matches_vector_reference_over_steps():
    method = GradVac(beta=0.3, seed=7)
    targets = np.zeros((4, 4))
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        jac = random_jacobian(4, p=6, seed=step)
        keys = torch.rand((4, 4), generator=gen).masked_fill(torch.eye(4, dtype=torch.bool), 2.0)
        orders = torch.argsort(keys, dim=1)[:, :3].numpy()
        np.testing.assert_allclose(direction(method, jac), gradvac_reference(jac, orders, targets, 0.3), atol=1e-9)
    np.testing.assert_allclose(method.targets.numpy(), targets, atol=1e-9)



def test_gradvac_two_tasks_match_vector_reference_over_steps():
    """T = 2 takes its own one-step path: checked over steps where the targets move, the pair
    conflicts or not, and one gradient is zero."""
    method = GradVac(beta=0.4)
    targets = np.zeros((2, 2))
    rng = np.random.default_rng(11)
    for step in range(6):
        jac = rng.normal(size=(2, 5))
        if step % 2:
            jac[1] = -0.8 * jac[0] + 0.3 * jac[1]  # conflicting
        if step == 4:
            jac[1] = 0.0
        expected = gradvac_reference(jac, [[1], [0]], targets, 0.4)
        np.testing.assert_allclose(direction(method, jac), expected, atol=1e-10)
        np.testing.assert_allclose(method.targets.numpy(), targets, atol=1e-12)

def test_gradvac_zero_gradient_task_is_never_a_partner():
    """A task whose gradient is zero (e.g. a converged task) has no direction to align with: it gets
    no vaccination step, the others' weights stay finite, and its own targets still update."""
    method = GradVac(beta=0.5, seed=3)
    targets = np.zeros((3, 3))
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        jac = random_jacobian(3, p=5, seed=step)
        jac[2] = jac[0] if step == 0 else 0.0  # aligned first (targets towards task 2 rise), then zero
        keys = torch.rand((3, 3), generator=gen).masked_fill(torch.eye(3, dtype=torch.bool), 2.0)
        orders = torch.argsort(keys, dim=1)[:, :2].numpy()
        weights = method.weights(torch.tensor(jac @ jac.T), torch.ones(3))
        assert torch.isfinite(weights).all() and (step == 0 or weights[2] == 1.0)
        np.testing.assert_allclose(weights.numpy() @ jac, gradvac_reference(jac, orders, targets, 0.5), atol=1e-9)
    np.testing.assert_allclose(method.targets.numpy(), targets, atol=1e-9)
    assert (method.targets.numpy()[:2] < 0).any()  # the conflicting pair did get vaccinated


# ------------------------------------------------------------------------------------------ CAGrad
def cagrad_reference(jac, c):
    """The official implementation's formulation (scipy SLSQP on the simplex)."""
    t = len(jac)
    gg = jac @ jac.T
    g0_norm = np.sqrt(gg.mean() + 1e-8)
    b = np.ones(t) / t
    cc = c * g0_norm + 1e-8
    obj = lambda x: x @ gg @ b + cc * np.sqrt(x @ gg @ x + 1e-8)
    res = minimize(obj, b, bounds=[(0, 1)] * t, constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 2000})
    gw = res.x @ jac
    d = jac.mean(0) + cc / (np.linalg.norm(gw) + 1e-8) * gw
    return d / (1 + c**2), obj(res.x), res.x


@pytest.mark.parametrize("t,c", [(2, 0.5), (4, 0.4), (6, 0.8)])
def test_cagrad_matches_official_slsqp_formulation(t, c):
    jac = random_jacobian(t, p=10, seed=t)
    ref, ref_obj, _ = cagrad_reference(jac, c)
    np.testing.assert_allclose(direction(CAGrad(c=c), jac), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_cagrad_with_zero_radius_is_the_mean_gradient():
    jac = random_jacobian(3)
    np.testing.assert_allclose(direction(CAGrad(c=0.0), jac), jac.mean(0), atol=1e-10)


@pytest.mark.parametrize("kind", ["random", "nearly_opposite", "aligned", "unequal_norms"])
def test_cagrad_two_tasks_closed_form_matches_a_bounded_scalar_search(kind):
    # T = 2 is solved in closed form; the official toy minimises the same 1-D problem with scipy's
    # bounded minimize_scalar, used here as the reference (on the normalised Gramian, as the solver).
    # With one gradient 10-100x shorter than the other the objective is monotone on [0, 1] (no
    # stationary point): the closed form's endpoint branch.
    from scipy.optimize import minimize_scalar

    from mtl_lightning.gradients.solvers import cagrad_simplex_weights

    rng = np.random.default_rng({"random": 0, "nearly_opposite": 1, "aligned": 2, "unequal_norms": 3}[kind])
    for _ in range(20):
        jac = rng.normal(size=(2, 6))
        if kind == "unequal_norms":
            jac[1] *= rng.uniform(0.01, 0.1)
        elif kind == "nearly_opposite":
            jac[1] = -rng.uniform(0.2, 3.0) * jac[0] + 1e-3 * rng.normal(size=6)
        elif kind == "aligned":
            jac[1] = rng.uniform(0.2, 3.0) * jac[0] + 0.3 * rng.normal(size=6)
        gram = jac @ jac.T
        m = gram / gram.mean()
        b = m.mean(1)
        for c in (0.4, 0.5, 0.8):
            obj = lambda g, b=b, c=c, m=m: np.array([g, 1 - g]) @ b + c * np.sqrt(np.array([g, 1 - g]) @ m @ np.array([g, 1 - g]) + 1e-8)
            ref = minimize_scalar(obj, bounds=(0, 1), method="bounded", options={"xatol": 1e-12})
            w = cagrad_simplex_weights(torch.tensor(gram), c).numpy()
            assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
            assert obj(w[0]) <= min(ref.fun, obj(0.0), obj(1.0)) + 1e-9


def test_cagrad_nearly_opposite_gradients_with_an_indefinite_gramian_stay_finite():
    # g1 ≈ −g2 (the average loss at its minimum), Gramian from float32 products: one eigenvalue is
    # slightly negative, so wᵀMw < 0 for some w. Seen on the two-objective toy (NaN before the fix).
    gram = torch.tensor([[0.06474335491657257, -0.06470233201980591],
                         [-0.06470233201980591, 0.06466133147478104]], dtype=torch.float64)
    assert torch.linalg.eigvalsh(gram)[0] < 0
    # T = 3 (iterative solver): g2 ≈ −g1 with a rounded Gramian whose mean is negative, g3 = 0.
    gram3 = torch.tensor([[1.0, -1.0000001, 0.0], [-1.0000001, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    for g in (gram, gram3):
        w = CAGrad(c=0.5).weights(g, torch.ones(len(g)))
        assert torch.isfinite(w).all()
        # d = Jᵀw stays as small as the average gradient (‖d‖ ≤ (1 + c)‖g_0‖ / (1 + c²)).
        d_sq = (w @ g @ w).clamp_min(0)
        assert float(d_sq.sqrt()) <= 1.5 * float(g.mean().clamp_min(0).sqrt() + 1e-4)


# ----------------------------------------------------------------------------------------- Nash-MTL
def test_nash_mtl_solves_the_bargaining_condition():
    jac = random_jacobian(4, p=9, seed=2)
    gram = torch.tensor(jac @ jac.T)
    alpha = NashMTL(max_norm=0.0).weights(gram, torch.ones(4))
    assert (alpha > 0).all()
    torch.testing.assert_close(gram @ alpha, 1 / alpha, atol=1e-8, rtol=1e-8)  # on M itself, not M/‖M‖


def test_nash_mtl_orthogonal_gradients_get_inverse_norm_weights():
    # M = diag(a², b²): α_t = 1/‖g_t‖, so every task's gradient contributes a unit-norm step.
    jac = np.array([[3.0, 0.0], [0.0, 0.5]])
    alpha = NashMTL(max_norm=0.0).weights(torch.tensor(jac @ jac.T), torch.ones(2)).numpy()
    np.testing.assert_allclose(alpha, [1 / 3.0, 1 / 0.5], rtol=1e-8)


def test_nash_mtl_clips_to_max_norm_and_warm_starts():
    jac = random_jacobian(3, p=5, seed=4) * 100
    method = NashMTL(max_norm=1.0)
    d = direction(method, jac)
    assert np.linalg.norm(d) == pytest.approx(1.0, rel=1e-5)
    assert method.alpha is not None and method.steps == 1


def official_nash_step(jac, max_norm=1.0, optim_niter=20, previous=None):
    """The official ``NashMTL`` (``methods/weight_methods.py`` of AvivNavon/nash-mtl) on one J:
    ``get_weighted_loss`` (cvxpy/ECOS sequential convex iterations on M/‖M‖ with the normalisation
    factor in the constraints), then ``backward``'s ``clip_grad_norm_`` of the shared gradient.
    Returns the update and α (the next step's warm start)."""
    import cvxpy as cp

    t = len(jac)
    alpha_param = cp.Variable(shape=(t,), nonneg=True)
    start = np.ones(t, dtype=np.float32) if previous is None else previous
    prvs_alpha_param = cp.Parameter(shape=(t,), value=start)
    g_param = cp.Parameter(shape=(t, t), value=np.eye(t))
    nf_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
    g_prvs_alpha = g_param @ prvs_alpha_param
    prvs_phi_tag = 1 / prvs_alpha_param + (1 / g_prvs_alpha) @ g_param
    phi_alpha = prvs_phi_tag @ (alpha_param - prvs_alpha_param)
    g_alpha = g_param @ alpha_param
    constraints = [-cp.log(alpha_param[i] * nf_param) - cp.log(g_alpha[i]) <= 0 for i in range(t)]
    problem = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi_alpha / nf_param), constraints)
    gtg = jac @ jac.T
    nf = np.linalg.norm(gtg).reshape((1,))
    gtg = gtg / nf.item()
    g_param.value, nf_param.value = gtg, nf
    alpha_t = start
    for _ in range(optim_niter):
        alpha_param.value = alpha_t
        prvs_alpha_param.value = alpha_t
        try:
            problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
        except Exception:  # the official code's bare except
            alpha_param.value = prvs_alpha_param.value
        if (alpha_param.value is None or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(alpha_param.value - prvs_alpha_param.value) < 1e-6):
            break
        alpha_t = alpha_param.value
    alpha = start if alpha_t is None else alpha_t
    d = alpha @ jac
    if max_norm > 0:
        d = d * min(1.0, max_norm / (np.linalg.norm(d) + 1e-6))
    return d, alpha


@pytest.mark.filterwarnings("ignore::UserWarning")  # cvxpy: "not DPP", "may be inaccurate"
@pytest.mark.parametrize("t,seed", [(2, 0), (2, 1), (3, 0), (3, 1), (4, 1)])
@pytest.mark.parametrize("scale", [0.01, 0.1, 0.3, 7.0])
def test_nash_mtl_step_equals_the_official_implementations(t, seed, scale):
    """The official solver is run as in training, warm-started from its last α, until its α solves
    Mα = 1/α; the library's step (default max_norm = 1) then equals its step. Small gradients are
    where the library's step used to be shorter: it solved M/‖M‖ without rescaling α by ‖M‖^−½ (at
    scale 0.01 its step was 2-5% of the official one)."""
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(t, 6))
    jac[1] = -0.6 * jac[0] + 0.4 * jac[1]
    jac *= scale
    alpha = None
    for _ in range(10):
        expected, alpha = official_nash_step(jac, previous=alpha)
        if np.abs(alpha * (jac @ jac.T @ alpha) - 1).max() < 1e-4:
            break
    assert np.abs(alpha * (jac @ jac.T @ alpha) - 1).max() < 1e-4  # the reference converged
    assert np.linalg.norm(expected) == pytest.approx(1.0, rel=1e-5)  # ‖d‖ = √T before clipping
    np.testing.assert_allclose(direction(NashMTL(), jac), expected, rtol=0, atol=1e-5)


def test_nash_mtl_update_every_reuses_the_weights_themselves():
    # The official code reuses α between updates: with the gradients ×10 at the second step, the
    # reused weights give a ×10 step (no re-solve, no renormalisation).
    jac = random_jacobian(3, p=6, seed=5)
    method = NashMTL(max_norm=0.0, update_every=2)
    first = method.weights(torch.tensor(jac @ jac.T), torch.ones(3))
    second = method.weights(torch.tensor(100 * jac @ jac.T), torch.ones(3))
    torch.testing.assert_close(second, first, rtol=0, atol=0)


# Degenerate Jacobians (zero, rank one, opposite, duplicated tasks, extreme scales) in every dtype:
# tests/test_method_properties.py, for every registered method.


GRAMIAN_WEIGHTINGS = [c for c in gradient_methods().values() if c.weights is not GradientBalancer.weights]


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("cls", GRAMIAN_WEIGHTINGS, ids=lambda c: c.__name__)
def test_weights_accept_a_float32_gramian(cls, t):
    """The training step hands ``weights`` a float64 Gramian, but a user calling it on a float32 one
    (CAGrad and Nash-MTL used to raise a dtype mismatch) gets the float64 answer up to float32 rounding."""
    jac = torch.tensor(random_jacobian(t, p=9, seed=t))
    gramian = jac @ jac.T
    single, double = cls(), cls()
    torch.manual_seed(0)
    got = single.weights(gramian.float(), torch.ones(t))
    torch.manual_seed(0)
    expected = double.weights(gramian.float().double(), torch.ones(t))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_imtl_g_identical_gradients_follow_them():
    g = np.array([1.0, 2.0, 0.0])
    np.testing.assert_allclose(direction(IMTLG(), [g, g]), g, atol=1e-12)


# ------------------------------------------------------------------------------------------- IMTL-G
def imtl_reference(jac):
    """LibMTL's IMTL-G formula on the Jacobian."""
    u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    D = jac[0:1] - jac[1:]
    U = u[0:1] - u[1:]
    alpha = jac[0] @ U.T @ np.linalg.inv(D @ U.T)
    return np.concatenate([[1 - alpha.sum()], alpha]) @ jac


@pytest.mark.parametrize("t", [2, 3, 5])
def test_imtl_g_equal_projections_and_reference(t):
    jac = random_jacobian(t, p=8, seed=10 + t, conflict=False)
    d = direction(IMTLG(), jac)
    projections = jac @ d / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-8)
    np.testing.assert_allclose(d, imtl_reference(jac), rtol=1e-8)


# --------------------------------------------------------------------------------------- Aligned-MTL
def aligned_reference(jac):
    m = jac @ jac.T
    lam, v = np.linalg.eigh(m)
    tol = lam.max() * len(m) * np.finfo(np.float32).eps
    keep = lam > tol
    lam, v = lam[keep], v[:, keep]
    b = np.sqrt(lam.min()) * v @ np.diag(1 / np.sqrt(lam)) @ v.T
    return b.sum(0) @ jac


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_aligned_mtl_condition_number_one_and_reference(rank_deficient):
    jac = random_jacobian(4, p=9, seed=3)
    if rank_deficient:
        jac[3] = jac[0] + jac[1]
    gram = torch.tensor(jac @ jac.T)
    aligned = AlignedMTL.balance_matrix(gram).numpy() @ jac
    singular = np.linalg.svd(aligned, compute_uv=False)
    singular = singular[singular > 1e-6 * singular.max()]
    assert len(singular) == (3 if rank_deficient else 4)
    np.testing.assert_allclose(singular / singular.max(), 1.0, atol=1e-8)
    np.testing.assert_allclose(direction(AlignedMTL(), jac), aligned_reference(jac), rtol=1e-7, atol=1e-10)


# -------------------------------------------------------------------------------------------- UPGrad
def upgrad_reference(jac):
    """Mean of the projections of each g_i onto {x : Jx ≥ 0}: x = g_i + Jᵀλ, λ = nnls(Jᵀ, −g_i)."""
    projections = []
    for g in jac:
        lam, _ = nnls(jac.T, -g)
        projections.append(g + jac.T @ lam)
    return np.mean(projections, axis=0)


@pytest.mark.parametrize("t", [2, 4, 7])
def test_upgrad_dual_cone_property_and_reference(t):
    jac = random_jacobian(t, p=12, seed=20 + t)
    d = direction(UPGrad(), jac)
    assert (jac @ d >= -1e-6 * np.linalg.norm(jac) * np.linalg.norm(d)).all()  # no task is hurt
    ref = upgrad_reference(jac)
    np.testing.assert_allclose(d, ref, atol=5e-3 * np.linalg.norm(ref))


def test_upgrad_non_conflicting_gradients_are_averaged():
    jac = np.array([[1.0, 0.2], [0.3, 1.0]])
    np.testing.assert_allclose(direction(UPGrad(reg_eps=0.0), jac), jac.mean(0), atol=1e-8)


# ------------------------------------------------------------------------------------------- DB-MTL
def test_db_mtl_log_gradients_moving_average_and_max_norm_balance():
    method = DBMTL(beta=0.9)
    jac1, jac2 = random_jacobian(3, p=5, seed=1), random_jacobian(3, p=5, seed=2)
    l1, l2 = np.array([2.0, 0.5, 1.0]), np.array([1.5, 0.4, 0.9])
    d1 = direction(method, jac1, l1)
    avg = jac1 / (l1[:, None] + 1e-8)
    n = np.linalg.norm(avg, axis=1)
    np.testing.assert_allclose(d1, (n.max() / (n + 1e-8)) @ avg, rtol=1e-10)
    d2 = direction(method, jac2, l2)
    avg = 0.9 * avg + 0.1 * jac2 / (l2[:, None] + 1e-8)
    n = np.linalg.norm(avg, axis=1)
    np.testing.assert_allclose(d2, (n.max() / (n + 1e-8)) @ avg, rtol=1e-10)
    # Balanced: every task's scaled moving average has the norm of the largest one.
    assert method.steps == 2


def test_db_mtl_under_loss_scale_equals_unscaled():
    jac, losses = random_jacobian(3, p=5, seed=1), torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    j = torch.tensor(jac)
    scale = torch.tensor(1024.0, dtype=torch.float64)
    (d_plain,), _ = DBMTL().aggregate([j.clone()], None, losses, None, None)
    (d_scaled,), _ = DBMTL().aggregate([j * scale], None, losses, scale, None)
    torch.testing.assert_close(d_scaled / scale, d_plain)


def test_db_mtl_overflowed_fp16_step_leaves_the_moving_average_unchanged():
    scale = torch.tensor(1024.0, dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    method = DBMTL(beta=0.9)
    j = torch.tensor(random_jacobian(3, p=5, seed=1))
    method.aggregate([j * scale], None, losses, scale, None)
    before = method.average[0].clone()
    overflowed = torch.tensor(random_jacobian(3, p=5, seed=2)) * scale
    overflowed[1, 2] = float("inf")
    method.aggregate([overflowed], None, losses, scale, None)
    torch.testing.assert_close(method.average[0], before, rtol=0, atol=0)
    method.aggregate([torch.tensor(random_jacobian(3, p=5, seed=3)) * scale], None, losses, scale, None)
    assert not torch.equal(method.average[0], before) and torch.isfinite(method.average[0]).all()


# ----------------------------------------------------------------------------------------- FairGrad
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_official_least_squares(alpha):
    jac = random_jacobian(4, p=9, seed=6)
    gg = jac @ jac.T
    ref = least_squares(lambda x: gg @ x - np.power(1 / x, 1 / alpha), np.ones(4) / 4, bounds=(0, np.inf),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    w = FairGrad(alpha=alpha).weights(torch.tensor(gg), torch.ones(4)).numpy()
    np.testing.assert_allclose(gg @ w, w ** (-1 / alpha), rtol=1e-8)
    np.testing.assert_allclose(w, ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GradDrop
def _graddrop_ctx(features):
    return SimpleNamespace(features=features, reduce_mean=lambda x: x)


def graddrop_reference(per_sample, features, uniform, leak):
    signed = (per_sample * np.sign(features)[None]).sum(1)
    purity = 0.5 * (1 + signed.sum(0) / (np.abs(signed).sum(0) + 1e-7))
    out = np.zeros_like(per_sample[0])
    for t in range(len(per_sample)):
        keep = ((purity > uniform) & (signed[t] > 0)) | ((purity < uniform) & (signed[t] < 0))
        out += per_sample[t] * (leak + (1 - leak) * keep)[None]
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_reference_masks(leak):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 5))
    per_sample = rng.normal(size=(3, 6, 5))
    method = GradDrop(leak=leak, seed=4)
    j = torch.tensor(per_sample)
    flat = j.reshape(3, -1)
    (d,), kept = method.aggregate([j], flat @ flat.T, torch.ones(3), None, _graddrop_ctx(torch.tensor(features)))
    uniform = torch.rand((5,), generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    np.testing.assert_allclose(d.numpy().reshape(6, 5), graddrop_reference(per_sample, features, uniform, leak))
    assert ((kept >= leak) & (kept <= 1)).all()


def test_graddrop_keeps_everything_when_signs_agree():
    features = torch.ones(4, 3, dtype=torch.float64)
    per_sample = torch.rand(2, 4, 3, dtype=torch.float64) + 0.1  # all positive: P = 1 > U
    flat = per_sample.reshape(2, -1)
    (d,), kept = GradDrop().aggregate([per_sample], flat @ flat.T, torch.ones(2), None, _graddrop_ctx(features))
    torch.testing.assert_close(d, per_sample.sum(0))
    torch.testing.assert_close(kept, torch.ones(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------- resumed state
# Every registered method (the registry lists the exported methods; the TorchJD adapter, which wraps
# a weighting given to it, is not one: tests/test_torchjd_adapter.py covers it).
EXPORTED = list(gradient_methods().values())


@pytest.mark.parametrize("cls", EXPORTED, ids=lambda c: c.__name__)
def test_a_method_rebuilt_from_its_checkpointed_state_continues_bit_for_bit(cls):
    """What a resumed run does: a fresh method loads the state_dict (through torch.save, loaded as
    weights only) of one that took two steps; both then aggregate the next steps to the same bits —
    random generators, moving averages and the solvers' warm starts included."""
    rng = np.random.default_rng(5)
    features = torch.tensor(rng.normal(size=(6, 5)))
    steps = [torch.tensor(random_jacobian(3, p=30, seed=s)).reshape(3, 6, 5) for s in range(5)]
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def step(method, jac):
        jac = jac.clone()  # aggregate may work in place
        flat = jac.reshape(3, -1)
        (d,), w = method.aggregate([jac], flat @ flat.T, losses, None, _graddrop_ctx(features))
        return d, w

    running = cls()
    for jac in steps[:2]:
        step(running, jac)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    resumed = cls()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for jac in steps[2:]:
        (d, w), (d_resumed, w_resumed) = step(running, jac), step(resumed, jac)
        assert torch.equal(d, d_resumed) and torch.equal(w, w_resumed), float((d - d_resumed).abs().max())


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("factory,message", [
    (lambda: GradDrop(mode="param"), "GradDrop: mode='param' is not supported"),
    (lambda: DBMTL(mode="rep"), "DBMTL: mode='rep' is not supported"),
    (lambda: MGDA(mode="representation"), "MGDA: mode='representation'"),
    (lambda: MGDA(normalization="l1"), "MGDA: normalization='l1'"),
    (lambda: CAGrad(c=-1), "CAGrad: c must be >= 0"),
    (lambda: NashMTL(update_every=0), "NashMTL: update_every"),
    (lambda: FairGrad(alpha=0), "FairGrad: alpha must be > 0"),
    (lambda: GradVac(beta=2), "GradVac: beta"),
    (lambda: DBMTL(beta=-0.1), "DBMTL: beta"),
    (lambda: GradDrop(leak=1.5), "GradDrop: leak"),
    (lambda: UPGrad(reg_eps=-1), "UPGrad: norm_eps and reg_eps"),
    (lambda: DualProj(norm_eps=-1), "DualProj: norm_eps and reg_eps"),
    (lambda: SDMGrad(lamda=-1), "SDMGrad: lamda"),
    (lambda: SDMGrad(momentum=1.0), "SDMGrad: need iterations"),
])
def test_bad_options_raise_clear_errors(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# ------------------------------------------------------------------------------------------ DualProj
@pytest.mark.parametrize("t,seed", [(2, 0), (3, 1), (5, 2), (7, 3)])
def test_dualproj_matches_torchjd(t, seed):
    """TorchJD's DualProjWeighting (quadprog on the normalised, regularised Gramian) is the reference."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(t, p=12, seed=seed)
    gram = torch.tensor(jac @ jac.T)
    expected = aggregation.DualProjWeighting()(gram)
    torch.testing.assert_close(DualProj().weights(gram, torch.ones(t)), expected, rtol=1e-6, atol=1e-8)
    d = direction(DualProj(reg_eps=0.0), jac)  # unregularised: exactly in the dual cone
    assert (jac @ d >= -1e-9 * np.linalg.norm(jac, axis=1) * np.linalg.norm(d)).all()


def test_dualproj_keeps_a_mean_that_conflicts_with_no_task():
    jac = np.array([[1.0, 0.2], [0.3, 1.0]])
    np.testing.assert_allclose(direction(DualProj(reg_eps=0.0), jac), jac.mean(0), atol=1e-10)


# -------------------------------------------------------------------------------------------- ConFIG
@pytest.mark.parametrize("t,seed", [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_config_matches_torchjd(t, seed):
    """TorchJD's ConFIG (pseudo-inverse of the unit rows, adapted from the official code) on J."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(t, p=12, seed=seed) * np.linspace(0.1, 5.0, t)[:, None]
    expected = aggregation.ConFIG()(torch.tensor(jac)).numpy()
    np.testing.assert_allclose(direction(ConFIG(), jac), expected, rtol=1e-9, atol=1e-12)


def test_config_equal_cosines_and_projection_length():
    jac = random_jacobian(4, p=9, seed=5)
    d = direction(ConFIG(), jac)
    cosines = jac @ d / (np.linalg.norm(jac, axis=1) * np.linalg.norm(d))
    np.testing.assert_allclose(cosines, cosines[0], rtol=1e-10)
    assert cosines[0] > 0
    np.testing.assert_allclose(np.linalg.norm(d), np.sum(jac @ d) / np.linalg.norm(d), rtol=1e-10)


# ------------------------------------------------------------------------------------------- SDMGrad
def sdmgrad_reference(jac, w, lamda=0.3, niter=20):
    """The official MTL code's ``sdmgrad`` (OptMN-Lab/sdmgrad) in numpy: projected SGD with momentum
    (lr 10, momentum 0.5) on ½wᵀḠw + λwᵀḠ1/T, sort-based simplex projection; returns d and w."""
    def project(v):
        u = np.sort(v)[::-1]
        cssv = np.cumsum(u)
        rho = np.nonzero(u * np.arange(1, len(v) + 1) > (cssv - 1))[0][-1]
        return np.clip(v - (cssv[rho] - 1) / (rho + 1.0), 0, None)

    gg = jac @ jac.T
    scale = np.mean(np.sqrt(np.diag(gg) + 1e-4))
    gg = gg / scale**2
    g_mean = gg.mean(1)
    buf = None
    for _ in range(niter):
        grad = gg @ w + lamda * g_mean
        buf = grad if buf is None else 0.5 * buf + grad
        w = project(w - 10 * buf)
    d = (w @ jac + lamda * jac.mean(0)) / (1 + lamda)
    return d, w


@pytest.mark.parametrize("t", [2, 3, 5])
def test_sdmgrad_matches_the_official_formula_over_steps(t):
    method = SDMGrad()
    w = np.ones(t) / t
    for step in range(3):  # w carries over between steps
        jac = random_jacobian(t, p=10, seed=10 * t + step) * (0.05 if step == 1 else 1.0)
        expected, w = sdmgrad_reference(jac, w)
        np.testing.assert_allclose(direction(method, jac), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(method.w.numpy(), w, atol=1e-12)


def test_simplex_projection_matches_a_qp():
    from mtl_lightning.gradients.solvers import project_onto_simplex

    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=5) * 3
        ref = minimize(lambda x, v=v: np.sum((x - v) ** 2), np.ones(5) / 5, bounds=[(0, None)] * 5,
                       constraints={"type": "eq", "fun": lambda x: x.sum() - 1}, method="SLSQP",
                       options={"ftol": 1e-15, "maxiter": 500}).x
        np.testing.assert_allclose(project_onto_simplex(torch.tensor(v)).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_the_host_iterations_equal_the_device_iterations(num_tasks: int) -> None:
    from mtl_lightning.gradients.sdmgrad import _projected_sgd, _projected_sgd_numpy

    g = torch.Generator().manual_seed(num_tasks)
    for lr in (0.1, 1.0, 10.0):
        jac = torch.randn(num_tasks, 7, generator=g, dtype=torch.float64)
        matrix = jac @ jac.T / jac.norm(dim=1).mean() ** 2
        pull = 0.3 * matrix.mean(1)
        start = torch.softmax(torch.randn(num_tasks, generator=g, dtype=torch.float64), 0)
        device = _projected_sgd(matrix, pull, start.clone(), lr, 0.5, 20)
        host = _projected_sgd_numpy(matrix.numpy(), pull.numpy(), start.numpy().copy(), lr, 0.5, 20)
        torch.testing.assert_close(torch.from_numpy(host), device, rtol=1e-12, atol=1e-14)
