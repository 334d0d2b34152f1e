"""Small solvers on the T×T Gramian, in torch on the model's device (no host round-trip).

The problems are tiny (T ≤ a few dozen) and ill-conditioned (task gradients are often nearly
parallel), so first-order methods (Frank–Wolfe, projected gradient) need hundreds of iterations
whose cost is all per-call overhead. These solvers use second-order steps instead: active-set
methods for problems over the simplex or the non-negative orthant (exact in at most about 2T steps
for quadratics, Newton steps otherwise) and a Newton method with a batched line search for the
power equations of Nash-MTL and FairGrad. Every step is a fixed-shape tensor computation (masks, no Python indexing).

Every solver stops once it has converged (see :func:`converged`): on the CPU, where reading a value
is free, the test runs after every iteration; on accelerators, where it is a host synchronisation,
after iterations 1, 2, 4, 8, … only. Linear systems are solved with ``solve_ex``, which (unlike
``torch.linalg.solve``, whose error check reads the LAPACK status) does not synchronise; every
system is regularised, so it is never singular. They work in float64.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

#: Step sizes tried at once by the batched line search: 1, 1/2, …, 1/2¹¹ of the longest step.
_LINE_SEARCH_STEPS = 12


def reading_is_free(flag: Tensor) -> bool:
    """Whether reading ``flag`` on the host costs no device synchronisation (it lives on the CPU)."""
    return flag.device.type == "cpu"


def surely(flag: Tensor) -> bool:
    """True when every entry of ``flag`` is True and reading it is free (CPU); always False on
    accelerators. For skipping a little work whose result would be discarded (a line search, a
    fallback), where a host synchronisation would cost more than the work."""
    return reading_is_free(flag) and bool(flag.all())


def host_value(value: Tensor) -> Optional[float]:
    """``value`` (0-dim) as a Python float where reading it is free (CPU); None on accelerators."""
    return float(value) if reading_is_free(value) else None


def all_finite(x: Tensor) -> Tensor:
    """Whether every entry of ``x`` is finite, as a 0-dim bool tensor: x − x is exactly 0 where x is
    finite and NaN where it is not (three small ops; ``isfinite(x).all()`` takes five)."""
    return (x - x == 0).all()


def converged(flag: Union[Tensor, bool], iteration: int) -> bool:
    """Whether a solver may stop after its 0-based ``iteration``: every entry of ``flag`` is True
    (a Python bool: a value the solver has already read on the host).

    On the CPU the flag is read after every iteration. On accelerators reading it synchronises with
    the host, so it is read only after iterations 1, 2, 4, 8, … (one synchronisation each): a
    warm-started solver converges in one or two iterations, so a step usually synchronises once or
    twice, and at most twice the iterations needed are run. Running the whole budget blind instead
    would launch every iteration's kernels (T = 16: 10–39 ms of small ops per step, see the README).
    Iterations past convergence do not move the solution, so the answer is the same on every device.
    """
    if isinstance(flag, bool):
        return flag
    done = iteration + 1
    if not reading_is_free(flag) and done & (done - 1):
        return False
    return bool(flag.all())


def warm_start(previous: Optional[Tensor], default: Tensor) -> Tensor:
    """``previous`` (the last step's solution) where it is usable as a start, else ``default``.

    The problems below have unique solutions, so the start changes the number of iterations, not the
    answer: solvers are warm-started from the last step's solution, which the next step's Gramian
    barely moves. A start of another shape or device, or with non-finite entries (a skipped fp16
    overflow step), is replaced by ``default`` without a host synchronisation.
    """
    if previous is None or previous.shape != default.shape or previous.device != default.device:
        return default
    previous = previous.to(default.dtype)
    return torch.where(all_finite(previous), previous, default)


def _face_matrix(hessian: Tensor, f: Tensor, shift: Optional[Tensor] = None) -> Tensor:
    """H on the free coordinates (``f``: 1 free, 0 fixed; batched over rows) and the identity on the
    fixed ones, so that solving with right-hand sides zero there leaves them at 0; ``shift`` (B, 1)
    adds a ridge to the free diagonal."""
    diagonal = 1 - f if shift is None else 1 - f + shift * f
    return hessian * (f.unsqueeze(-1) * f.unsqueeze(-2)) + torch.diag_embed(diagonal)


def _simplex_face_solves(matrix: Tensor, f: Tensor, vector: Tensor) -> tuple[Tensor, Tensor]:
    """H_FF⁻¹1_F and H_FF⁻¹v_F (zero on fixed coordinates) from one batched solve with two right-hand
    sides: every face step on the simplex combines these two."""
    rhs = torch.stack([f, vector * f], -1)
    ones_solution, vector_solution = torch.linalg.solve_ex(matrix, rhs).result.unbind(-1)
    return ones_solution, vector_solution


def _one_per_row(coordinates: Tensor, index: Tensor, where: Tensor) -> Tensor:
    """Boolean (B, T) mask holding coordinate ``index[b]`` of each row b where ``where[b]`` ((T,) for a
    single problem: 0-dim ``index`` and ``where``)."""
    return (coordinates == index.unsqueeze(-1)) & where.unsqueeze(-1)


def _face_newton(hessian: Tensor, grad: Tensor, free: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Newton direction d over the free coordinates only, with Σd = 0 (the simplex), for one problem.

    Returns d (zero on fixed coordinates) and μ, the multiplier of Σd = 0: H_FF d_F + g_F + μ = 0,
    i.e. d = −H_FF⁻¹(g_F + μ1) with μ = −1ᵀH_FF⁻¹g_F / 1ᵀH_FF⁻¹1.
    """
    f = free.to(grad.dtype)
    # A ridge relative to the Hessian's scale keeps the face system regular where H is singular.
    shift = hessian.diagonal().abs().amax().clamp_min(1e-30) * ridge
    ones_solution, grad_solution = _simplex_face_solves(_face_matrix(hessian, f, shift), f, grad)
    level = grad_solution.sum() / ones_solution.sum()  # −μ
    return torch.addcmul(grad_solution, level, ones_solution, value=-1).neg_(), -level


def active_set_qp(hessian: Tensor, linear: Optional[Tensor], start: Tensor, simplex: bool, iterations: int,
                  tol: float = 1e-10) -> Tensor:
    """min ½xᵀHx + cᵀx subject to x ≥ 0 (and Σ_t x_t = 1 when ``simplex``) for a batch of convex
    quadratics sharing H (T, T), with c = ``linear`` (B, T; None: 0, only with ``simplex``) and a
    feasible ``start`` (B, T).

    A primal active-set method (Wolfe's min-norm-point and Lawson–Hanson's NNLS algorithms): each step
    solves for the optimum on the face of the free coordinates (one batched solve of the masked
    system, two right-hand sides on the simplex), moves towards it until a coordinate reaches 0 (that
    coordinate is fixed), and at the face optimum frees the fixed coordinate whose reduced gradient is
    most negative. Exact after finitely many steps; stops at a KKT point up to ``tol``.
    """
    if linear is None and not simplex:
        raise ValueError("active_set_qp: without the simplex constraint the linear term is required.")
    x = start
    free = x > 0
    coordinates = torch.arange(x.shape[1], device=x.device)
    for iteration in range(iterations):
        f = free.to(x.dtype)
        matrix = _face_matrix(hessian, f)
        # The multiplier ν of Σx = 1 (0 without the simplex): x_F = ν H_FF⁻¹1 − H_FF⁻¹c_F, Σx_F = 1.
        if not simplex:
            assert linear is not None  # checked above
            level = None
            target = torch.linalg.solve_ex(matrix, linear * f).result.neg_()
        elif linear is None:
            ones_solution = torch.linalg.solve_ex(matrix, f.unsqueeze(-1)).result.squeeze(-1)
            level = ones_solution.sum(-1, keepdim=True).reciprocal()
            target = ones_solution * level
        else:
            ones_solution, linear_solution = _simplex_face_solves(matrix, f, linear)
            level = (1 + linear_solution.sum(-1, keepdim=True)) / ones_solution.sum(-1, keepdim=True)
            target = level * ones_solution - linear_solution
        d = target - x
        longest, blocking = (x / -d).masked_fill_(~(d < 0), torch.inf).min(dim=1)
        blocked = longest < 1
        x = torch.addcmul(x, longest.clamp(max=1).unsqueeze(-1), d).clamp_min_(0)
        leaving = _one_per_row(coordinates, blocking, blocked)
        x = x.masked_fill_(leaving, 0)
        free = free & ~leaving
        # At the face optimum the free coordinates' gradients all equal ν; a fixed one below ν (below
        # 0 without the simplex) is a descent direction.
        violation = x @ hessian
        if linear is not None:
            violation = violation + linear
        if level is not None:
            violation = violation - level
        worst, entering = violation.masked_fill_(free, torch.inf).min(dim=1)
        enter = ~blocked & (worst < -tol)
        free = free | _one_per_row(coordinates, entering, enter)
        if simplex:
            x = x / x.sum(dim=1, keepdim=True)
        if converged(~(blocked | enter), iteration):
            break
    return x


def active_set_newton(
    grad_hessian: Callable[[Tensor], tuple[Tensor, Tensor]],
    value: Callable[[Tensor], Tensor],
    start: Tensor,
    iterations: int,
    tol: float = 1e-10,
) -> Tensor:
    """min F(x) subject to x ≥ 0 and Σ_t x_t = 1 for a smooth convex F.

    ``start`` (T,) is feasible; ``grad_hessian(x)`` returns ∇F (T,) and ∇²F (T, T); ``value(rows)``
    evaluates F on each row of a (K, T) batch. The active-set method of :func:`active_set_qp` with
    Newton steps on the face (the blocking coordinate fixed at 0) and a batched backtracking line
    search; at a face optimum the fixed coordinate with the most negative reduced gradient is freed.
    Stops at a point satisfying the KKT conditions up to ``tol``.
    """
    x = start
    free = x > 0
    coordinates = torch.arange(x.shape[0], device=x.device)
    for iteration in range(iterations):
        grad, hessian = grad_hessian(x)
        # A relative ridge keeps the Newton system regular where the Hessian is singular.
        d, mu = _face_newton(hessian, grad, free, ridge=1e-10)
        longest, blocking = (x / -d).masked_fill_(~(free & (d < 0)), torch.inf).min(0)
        longest = longest.clamp(max=1.0)
        # Near the face optimum (Newton decrement −gᵀd below 0.01) the full step converges
        # quadratically and the objective's differences fall below float64 resolution: take it
        # without a line search. Elsewhere: the best of 1, 1/2, …, 1/2¹¹ of the longest step, or none.
        close = grad @ d > -0.01
        small = d.abs().amax() < tol**0.5
        theta, at_face_optimum = longest, (longest >= 1.0) & small
        if not surely(close):
            steps = longest * torch.pow(0.5, torch.arange(_LINE_SEARCH_STEPS, dtype=x.dtype, device=x.device))
            values = value(x + steps.unsqueeze(-1) * d)  # (K, T) candidates
            best_value, best = values.min(0)
            improves = best_value < value(x.unsqueeze(0))[0]
            searched = torch.where(improves, steps[best], torch.zeros_like(longest))
            theta = torch.where(close, theta, searched)
            at_face_optimum = torch.where(close, at_face_optimum, ~improves | ((searched >= 1.0) & small))
        blocked = (theta >= longest) & (longest < 1.0)
        x = torch.addcmul(x, theta, d).clamp_min_(0)
        leaving = _one_per_row(coordinates, blocking, blocked)
        x = x.masked_fill_(leaving, 0)
        free = free & ~leaving
        # Reduced gradient after the step (to second order): on a face optimum the free coordinates
        # share the value ν = −μ; a fixed coordinate below ν is a descent direction.
        violation = torch.addcmul(grad, theta, hessian @ d).add_(mu).masked_fill_(free, torch.inf)
        worst, entering = violation.min(0)
        done = at_face_optimum & ~blocked
        enter = done & (worst < -tol)
        free = free | _one_per_row(coordinates, entering, enter)
        x = x / x.sum()
        if converged(done & ~enter, iteration):
            break
    return x


def min_norm_simplex(gramian: Tensor, iterations: Optional[int] = None, start: Optional[Tensor] = None) -> Tensor:
    """argmin_{w ∈ simplex} wᵀMw: the minimum-norm point of the convex hull of the task gradients
    (MGDA, Sener & Koltun, arXiv 1810.04650), exactly, by the active-set method from ``start`` (a
    point of the simplex; default uniform weights); the closed form for T = 2. ``iterations``: budget of
    active-set steps, default 2T + 4 (each task enters or leaves the support about once)."""
    m = gramian.double()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=m.dtype, device=m.device)
    if t == 2:
        return _min_norm_pair_weights(m)
    q = m / m.diagonal().mean().clamp_min(1e-30)
    q.diagonal().add_(1e-12)
    x = warm_start(start, torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)).clamp_min(0)
    budget = 2 * t + 4 if iterations is None else iterations
    return active_set_qp(q, None, (x / x.sum()).unsqueeze(0), simplex=True, iterations=budget)[0]


def _min_norm_pair_weights(m: Tensor) -> Tensor:
    """The T = 2 case of :func:`min_norm_simplex` in closed form: w = (γ, 1 − γ) with
    γ = clip((M₂₂ − M₁₂)/‖g₁ − g₂‖², 0, 1), and γ = ½ where the two gradients coincide."""
    m11, m12, _, m22 = m.reshape(-1).unbind()
    rest = m22 - m12
    denominator = (m11 - m12).add_(rest)  # ‖g₁ − g₂‖²
    gamma = torch.where(denominator > 0, rest / denominator.clamp_min(1e-30), 0.5).clamp_(0, 1)
    return torch.stack([gamma, 1 - gamma])


def cagrad_simplex_weights(gramian: Tensor, c: float, iterations: Optional[int] = None,
                           start: Optional[Tensor] = None) -> Tensor:
    """argmin_{w∈simplex} wᵀM 1/T + c‖g_0‖ √(wᵀMw) (CAGrad's dual, arXiv 2110.14048; the official code
    solves it with scipy's SLSQP from w = 1/T): active-set Newton with a line search, from ``start``
    (default 1/T), within ``iterations`` Newton steps (default 2T + 20)."""
    m = gramian.double()
    t = m.shape[0]
    # Dividing the objective by s = mean ‖g_t‖² leaves the minimiser unchanged: c‖g_0‖√(wᵀMw) becomes
    # c√(‖g_0‖²/s)√(wᵀ(M/s)w). (Not by ‖g_0‖² itself, which vanishes when the gradients cancel.)
    m = m / m.diagonal().mean().clamp_min(1e-30)
    b = m.mean(dim=1)  # M 1/T
    c_scaled = b.mean().clamp_min(0).sqrt() * c
    if t == 2:
        return _cagrad_pair_weights(m, b, c_scaled)

    # A float32 Gramian can be slightly indefinite (g_1 ≈ −g_2): wᵀMw is clamped at 0.
    def value(rows: Tensor) -> Tensor:
        return rows @ b + c_scaled * (((rows @ m) * rows).sum(-1).clamp_min(0) + 1e-8).sqrt()

    def grad_hessian(x: Tensor) -> tuple[Tensor, Tensor]:
        mx = m @ x
        squared = (mx @ x).clamp_min(0) + 1e-8  # wᵀMw, as in value()
        k = c_scaled / squared.sqrt()
        # ∇ = b + c Mx/r and ∇² = c(M/r − Mx(Mx)ᵀ/r³) with r = √(xᵀMx): k = c/r.
        hessian = (m - torch.outer(mx, mx / squared)) * k
        hessian.diagonal().add_(1e-12)
        return torch.addcmul(b, k, mx), hessian

    x = warm_start(start, torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)).clamp_min(0)
    budget = 2 * t + 20 if iterations is None else iterations
    return active_set_newton(grad_hessian, value, x / x.sum(), iterations=budget)


def _cagrad_pair_weights(m: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The T = 2 case of :func:`cagrad_simplex_weights` in closed form (the official toy minimises the
    same one-dimensional problem with a bounded scalar search).

    With w = (γ, 1−γ): F(γ) = b₂ + βγ + c√(q(γ) + 1e-8), β = b₁ − b₂, q(γ) = Aγ² + 2Bγ + m₂₂, is convex.
    Where c²A > β², F'(γ) = 0 at u = Aγ + B = −β√(D/(c²A − β²)), D = A(m₂₂ + 1e-8) − B², and the
    minimum over [0, 1] is that root clamped. Elsewhere |c ∂√q/∂γ| ≤ c√A ≤ |β|: F is monotone, with
    its minimum at γ = 1 where β < 0 and at γ = 0 otherwise (F is constant where β = 0). Near a
    Pareto-stationary point (g_w ≈ 0, where the square root is not smooth) iterative solvers need
    many steps; this does not.
    """
    m11, m12, _, m22 = m.reshape(-1).unbind()
    b1, b2 = b.unbind()
    a = m11 - 2 * m12 + m22
    bb = m12 - m22
    beta = b1 - b2
    d = (m22 + 1e-8).mul_(a).addcmul_(bb, bb, value=-1).clamp_min_(0)
    room = (c * c * a).addcmul_(beta, beta, value=-1)  # c²A − β²: > 0 iff F has a stationary point
    u = (d / room).sqrt_().mul_(beta).neg_()
    gamma = torch.where(room > 0, ((u - bb) / a).clamp_(0, 1), (beta < 0).to(m.dtype))
    return torch.stack([gamma, 1 - gamma])


def dual_cone_weights(gramian: Tensor, iterations: Optional[int] = None, start: Optional[Tensor] = None) -> Tensor:
    """Row i: v_i = argmin_v vᵀMv subject to v ≥ e_i, for every i at once (UPGrad, arXiv 2406.16232).

    Jᵀv_i is the projection of g_i onto the dual cone {x : Jx ≥ 0}. :func:`dual_cone_projection`
    with the lower bounds I, from ``start`` (a previous solution v; default v = I); the closed form
    for T = 2. ``gramian`` should be normalised and regularised (positive definite) by the caller, as
    TorchJD does.
    """
    m = gramian.double()
    if m.shape[0] == 2:
        return _dual_cone_pair(m)
    return dual_cone_projection(m, torch.eye(m.shape[0], dtype=m.dtype, device=m.device), iterations, start)


def dual_cone_projection(gramian: Tensor, lower: Tensor, iterations: Optional[int] = None,
                         start: Optional[Tensor] = None) -> Tensor:
    """Row b: v_b = argmin_v vᵀMv subject to v ≥ u_b (``lower`` (B, T)), so that Jᵀv_b is the
    projection of Jᵀu_b onto the dual cone {x : Jx ≥ 0} (Proposition 1 of arXiv 2406.16232).

    Solved as B non-negative quadratic programs in x = v − u_b by the active-set method, from
    ``start`` (a previous solution v, or ``lower``), within ``iterations`` active-set steps (default
    2T + 4).
    """
    m = gramian.double()
    lower = lower.to(m.dtype)
    t = m.shape[0]
    eye = torch.eye(t, dtype=m.dtype, device=m.device)
    hessian = 2 * m + 1e-12 * m.diagonal().abs().max().clamp_min(1e-30) * eye  # regular even for reg_eps = 0
    x = (warm_start(start, lower) - lower).clamp_min(0)
    budget = 2 * t + 4 if iterations is None else iterations
    # ½(x + u)ᵀH(x + u) = ½xᵀHx + (Hu)ᵀx + const: row b's linear term is H u_b.
    return active_set_qp(hessian, lower @ hessian, x, simplex=False, iterations=budget) + lower


def _dual_cone_pair(m: Tensor) -> Tensor:
    """The T = 2 case of :func:`dual_cone_weights` in closed form: v_i = e_i + max(0, −M_ij/M_jj) e_j.

    For a fixed v_i the best v_j ≥ 0 is max(0, −M_ij v_i/M_jj); what remains, v_i²(M_ii − M_ij²/M_jj),
    is non-negative and grows with v_i ≥ 1, so v_i = 1. A zero gradient (M_jj = 0, then M_ij = 0) is
    never projected onto."""
    partner = (m[0, 1] / m.diagonal().flip(0).clamp_min(1e-30)).neg_().clamp_min_(0)  # row i: −M_ij/M_jj
    return torch.diag(partner).flip(1).add_(torch.eye(2, dtype=m.dtype, device=m.device))


def power_balance(gramian: Tensor, power: float, init: Tensor, iterations: int = 30, tol: float = 1e-10) -> Tensor:
    """Positive solution w of M w = w^(−1/power) (elementwise power).

    power = 1 is Nash-MTL's bargaining condition Mα = 1/α (arXiv 2202.01017); general power is
    FairGrad's α-fair condition (arXiv 2402.15638). It is the minimiser of the strictly convex
    G(w) = ½wᵀMw − Σ φ(w_t) with φ' = w^(−1/power), found by Newton steps with a batched
    backtracking line search that keeps every coordinate positive; stops after a full step from a
    Newton decrement below √``tol``. Where no positive solution exists (exactly opposite gradients, a
    Pareto-stationary point) the iterates grow along the direction where Jᵀw = 0 until ``iterations``
    run out: finite weights whose update has no component along the conflicting gradients. Where the
    iterates end not finite (a singular Newton system, a non-finite Gramian of an fp16 overflow step)
    ``init`` is returned: callers keep their previous weights, as the official Nash-MTL does.
    """
    m = gramian.double()
    p = float(power)
    if p == 1.0 and m.shape[0] == 2:
        pair = _nash_pair_weights(m)
        # One read (a synchronisation on accelerators, as the Newton path's first convergence test
        # would be); opposite or zero gradients, where the closed form is not finite, take Newton.
        if bool(all_finite(pair)):
            return pair
    w = init.double().clamp_min(1e-8)
    exponent = 1.0 - 1.0 / p

    def objective(x: Tensor) -> Tensor:
        barrier = torch.log(x) if p == 1.0 else x.pow(exponent) / exponent
        quadratic = 0.5 * ((x @ m) * x).sum(-1)
        return torch.where((x > 0).all(-1), quadratic - barrier.sum(-1), torch.full_like(quadratic, float("inf")))

    for iteration in range(iterations):
        barrier_grad = w.pow(-1.0 / p)  # φ'(w)
        residual = m @ w - barrier_grad
        hessian = m.clone()
        hessian.diagonal().add_(barrier_grad / w, alpha=1.0 / p)  # −φ''(w) = w^(−1/p−1)/p
        delta = torch.linalg.solve_ex(hessian, residual).result  # singular only once diverged (see above)
        decrement_squared = residual @ delta
        newton = w - delta
        # Close to the solution (Newton decrement below 0.1) the full step converges quadratically,
        # while the objective's differences fall below float64 resolution: it is taken without
        # comparing (shortened to 99% of the way to the boundary where it would end closer to it:
        # 99(w − δ) < δ). On the CPU the decrement is read once and decides this and the stopping test.
        decrement = host_value(decrement_squared)
        surely_close = decrement is not None and decrement < 0.01
        if not (surely_close and bool((newton * 99 >= delta).all())):
            # At most 99% of the way to the boundary, then the best of 1, 1/2, …, 1/2¹¹ of that.
            longest = (0.99 * (w / delta).masked_fill_(~(delta > 0), torch.inf).min()).clamp_(max=1.0)
            damped = torch.addcmul(w, longest, delta, value=-1)
            if not surely_close:
                fractions = torch.pow(0.5, torch.arange(_LINE_SEARCH_STEPS, dtype=w.dtype, device=w.device))
                candidates = w - (longest * fractions).unsqueeze(-1) * delta
                values = objective(candidates)
                best = torch.argmin(values)
                searched = torch.where(values[best] < objective(w), candidates[best], w)
                damped = torch.where(decrement_squared < 0.01, damped, searched)
            newton = damped
        w = newton
        # Newton converges quadratically: the full step from a decrement below √tol lands within ~tol.
        # (A NaN decrement means the iterates diverged: stop too.)
        if converged(~(decrement_squared >= tol) if decrement is None else not decrement >= tol, iteration):
            break
    return torch.where(all_finite(w), w, init.to(w.dtype))


def _nash_pair_weights(m: Tensor) -> Tensor:
    """The T = 2 case of Mα = 1/α in closed form: subtracting the two equations gives
    ‖g_1‖α_1 = ‖g_2‖α_2, whence α_1 = √(‖g_2‖ / (‖g_1‖(‖g_1‖‖g_2‖ + M_12))) and symmetrically.
    Not finite where no positive solution exists (opposite or zero gradients)."""
    norms = m.diagonal().sqrt()
    product = norms[0] * norms[1]
    return (norms.flip(0) / (norms * (product + m[0, 1]))).sqrt()


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` (T,) onto the probability simplex (sort-based, exact):
    (v − θ)₊ with θ = (Σ_{k≤ρ} u_k − 1)/ρ, u = v sorted in decreasing order, ρ the largest k with
    u_k > (Σ_{j≤k} u_j − 1)/k."""
    u = torch.sort(v, descending=True).values
    thresholds = (u.cumsum(0) - 1) / torch.arange(1, v.shape[0] + 1, dtype=v.dtype, device=v.device)
    rho = (u > thresholds).sum().clamp_min(1) - 1  # u_1 > u_1 − 1: at least one
    return (v - thresholds[rho]).clamp_min(0)


def project_onto_simplex_host(v: np.ndarray) -> np.ndarray:
    """:func:`project_onto_simplex` on a host array: the same operations, for inner loops on the CPU
    where each tiny torch op costs more than NumPy's."""
    u = -np.sort(-v)
    thresholds = (np.cumsum(u) - 1) / np.arange(1, v.shape[0] + 1, dtype=v.dtype)
    rho = max(int((u > thresholds).sum()), 1) - 1
    return np.maximum(v - thresholds[rho], 0.0)
