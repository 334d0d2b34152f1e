"""Small solvers on the T×T Gramian, in torch on the model's device (no host round-trip).

On accelerators every solver runs its full iteration budget (iterations after convergence change
nothing), so that no Python-side convergence test forces a device synchronisation; on the CPU, where
reading a value costs nothing, they stop as soon as they have converged. They work in float64: the
problems are tiny (T ≤ a few dozen) and conditioning matters more than speed there.
"""

from __future__ import annotations

import torch
from torch import Tensor


def converged(change: Tensor, tol: float) -> bool:
    """True when ``change`` < ``tol`` and reading it is free (CPU tensors); always False on accelerators."""
    return change.device.type == "cpu" and bool(change < tol)


def min_norm_pair(m11: Tensor, m12: Tensor, m22: Tensor) -> tuple[Tensor, Tensor]:
    """Closed form of min_{γ∈[0,1]} ‖γ g_1 + (1−γ) g_2‖² from the Gramian entries.

    Returns (γ, squared norm at γ); elementwise over batched entries.
    """
    denom = m11 + m22 - 2 * m12
    gamma = torch.where(denom > 0, (m22 - m12) / denom.clamp_min(1e-30), torch.full_like(denom, 0.5)).clamp(0, 1)
    cost = gamma**2 * m11 + (1 - gamma) ** 2 * m22 + 2 * gamma * (1 - gamma) * m12
    return gamma, cost


def frank_wolfe_min_norm(gramian: Tensor, iterations: int = 250, tol: float = 1e-5) -> Tensor:
    """argmin_{w ∈ simplex} wᵀMw (MGDA) by Frank–Wolfe with exact line search, started from the best
    pair of tasks (Sener & Koltun, arXiv 1810.04650; their ``MinNormSolver``)."""
    m = gramian.double()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=m.dtype, device=m.device)
    i, j = torch.triu_indices(t, t, offset=1, device=m.device)
    gamma, cost = min_norm_pair(m[i, i], m[i, j], m[j, j])
    best = torch.argmin(cost)
    w = torch.zeros(t, dtype=m.dtype, device=m.device)
    w = w.index_put((i[best],), gamma[best]).index_put((j[best],), 1 - gamma[best], accumulate=True)
    if t == 2:
        return w  # the best pair is the exact solution
    eye = torch.eye(t, dtype=m.dtype, device=m.device)
    for _ in range(iterations):
        grad = m @ w
        vertex = torch.argmin(grad)
        v1v1 = w @ grad
        v1v2 = grad[vertex]
        v2v2 = m[vertex, vertex]
        step, _ = min_norm_pair(v2v2, v1v2, v1v1)  # weight of the vertex
        new = (1 - step) * w + step * eye[vertex]
        change = (new - w).abs().sum()
        w = new
        if converged(change, tol):  # the official stopping rule: Σ|Δw| < 1e-5
            break
    return w


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / k) > 0).to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def cagrad_simplex_weights(gramian: Tensor, c: float, iterations: int = 200, tol: float = 1e-10) -> Tensor:
    """argmin_{w∈simplex} wᵀM 1/T + c‖g_0‖ √(wᵀMw) (CAGrad's dual, arXiv 2110.14048) by projected
    gradient descent with a step adapted to the local curvature of the square root."""
    m = gramian.double()
    t = m.shape[0]
    scale = m.mean().clamp_min(1e-30)  # ‖g_0‖²: the problem is invariant to scaling M
    m = m / scale
    b = m.mean(dim=1)  # M 1/T
    if t == 2:
        return _cagrad_pair_weights(m, b, c)
    lipschitz = torch.linalg.matrix_norm(m, ord=2).clamp_min(1e-12)
    w = torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)
    for _ in range(iterations):
        mw = m @ w
        root = ((w @ mw).clamp_min(0) + 1e-8).sqrt()  # a float32 Gramian can be slightly indefinite
        grad = b + c * mw / root
        step = 1.0 / (lipschitz * (1 + c / root))
        new = project_to_simplex(w - step * grad)
        change = (new - w).abs().max()
        w = new
        if converged(change, tol):
            break
    return w


def _cagrad_pair_weights(m: Tensor, b: Tensor, c: float) -> Tensor:
    """The T = 2 case of :func:`cagrad_simplex_weights` in closed form (the official toy minimises the
    same one-dimensional problem with a bounded scalar search).

    With w = (γ, 1−γ): F(γ) = b₂ + βγ + c√(q(γ) + 1e-8), β = b₁ − b₂, q(γ) = Aγ² + 2Bγ + m₂₂ convex.
    F'(γ) = 0 gives u = Aγ + B = −sign(β)|β|√(D/(c²A − β²)), D = A(m₂₂ + 1e-8) − B². The minimum is
    the best of γ = 0, 1 and that root. Near a Pareto-stationary point (g_w ≈ 0, where the square
    root is not smooth) the projected-gradient iterations need their whole budget; this does not.
    """
    a = m[0, 0] - 2 * m[0, 1] + m[1, 1]
    bb = m[0, 1] - m[1, 1]
    beta = b[0] - b[1]
    d = (a * (m[1, 1] + 1e-8) - bb**2).clamp_min(0)
    u = -torch.sign(beta) * beta.abs() * (d / (c**2 * a - beta**2)).sqrt()
    root = (u - bb) / a
    root = torch.where(torch.isfinite(root), root, torch.full_like(root, 0.5)).clamp(0, 1)
    gammas = torch.stack([torch.zeros_like(root), torch.ones_like(root), root])
    q = (a * gammas**2 + 2 * bb * gammas + m[1, 1]).clamp_min(0)
    objective = b[1] + beta * gammas + c * (q + 1e-8).sqrt()
    gamma = gammas[torch.argmin(objective)]
    return torch.stack([gamma, 1 - gamma])


def power_balance(gramian: Tensor, power: float, init: Tensor, iterations: int = 20, tol: float = 1e-12) -> Tensor:
    """Positive solution w of M w = w^(−1/power) (elementwise power).

    power = 1 is Nash-MTL's bargaining condition Mα = 1/α (arXiv 2202.01017); general power is
    FairGrad's α-fair condition (arXiv 2402.15638). It is the minimiser of the strictly convex
    ½wᵀMw − Σ φ(w_t) with φ' = w^(−1/power), found by damped Newton steps that stay positive.
    """
    m = gramian.double()
    w = init.double().clamp_min(1e-8)
    p = float(power)
    for _ in range(iterations):
        residual = m @ w - w.pow(-1.0 / p)
        hessian = m + torch.diag(w.pow(-1.0 / p - 1.0) / p)
        delta = torch.linalg.solve(hessian, residual)
        decrement = (residual @ delta).clamp_min(0).sqrt()
        step = 1.0 / (1.0 + decrement)
        # Keep every coordinate positive (at most 90% of the way to the boundary).
        limit = torch.where(delta > 0, w / delta.clamp_min(1e-300), torch.full_like(w, float("inf"))).min()
        step = torch.minimum(step, 0.9 * limit)
        w = w - step * delta
        if converged(decrement, tol):
            break
    return w


def dual_cone_weights(gramian: Tensor, iterations: int = 300, tol: float = 1e-10) -> Tensor:
    """Row i: v_i = argmin_v vᵀMv subject to v ≥ e_i, for every i at once (UPGrad, arXiv 2406.16232).

    Jᵀv_i is the projection of g_i onto the dual cone {x : Jx ≥ 0}. Solved by accelerated projected
    gradient (FISTA) on the box constraint; ``gramian`` should be normalised and
    regularised (positive definite) by the caller.
    """
    m = gramian.double()
    t = m.shape[0]
    lower = torch.eye(t, dtype=m.dtype, device=m.device)
    step = 1.0 / (2 * torch.linalg.matrix_norm(m, ord=2).clamp_min(1e-12))
    v = lower.clone()
    y = v
    momentum = torch.ones((), dtype=m.dtype, device=m.device)
    for _ in range(iterations):
        v_next = torch.maximum(y - step * 2 * (y @ m), lower)
        momentum_next = (1 + (1 + 4 * momentum**2).sqrt()) / 2
        y = v_next + ((momentum - 1) / momentum_next) * (v_next - v)
        change = (v_next - v).abs().max()
        v = v_next
        momentum = momentum_next
        if converged(change, tol):
            break
    return v
