"""Nash-MTL: the Nash bargaining solution of the tasks (Navon et al., arXiv 2202.01017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import power_balance


class NashMTL(GradientBalancer):
    """α > 0 with Mα = 1/α (the Nash bargaining solution); d = Jᵀα, its norm clipped to ``max_norm``.

    As in the official code, the system is solved on the normalised Gramian M̃ = M/‖M‖_F (for the
    solver's conditioning): α̃ with M̃α̃ = 1/α̃, then α = α̃/‖M‖_F^½, which solves Mα = 1/α (the
    official constraint log(α_t·‖M‖_F) + log((M̃α)_t) ≥ 0 undoes the normalisation the same way).
    So, as the paper shows, the update does not change when every g_t is rescaled by its own
    c_t > 0 (α_t → α_t/c_t), g_t·d = 1/α_t > 0 for every task, and ‖d‖ = √T before the clipping,
    which (as the official ``clip_grad_norm_`` on the shared parameters) scales d to norm
    ``max_norm`` where it is longer.

    Solved by damped Newton iterations in torch (the official code runs ≤ 20 convex iterations of
    cvxpy/ECOS, which can stop short of the solution); α is kept (checkpointed) as the warm start of
    the next step. With ``update_every`` > 1 the weights are recomputed every that many optimizer
    steps and reused in between (official ``update_weights_every``, which reuses α itself).

    T = 2 is solved in closed form: α_1 = √(‖g_2‖ / (‖g_1‖(‖g_1‖‖g_2‖ + g_1·g_2))), and
    symmetrically α_2.
    Exactly opposite gradients (a Pareto-stationary point) have no positive solution: the iterations
    then grow α along the direction where Σ α_t g_t = 0, so the update is ≈ 0 (the official code
    keeps the previous α when cvxpy fails). All-zero gradients keep the previous α (d = 0 anyway).
    In rep mode ``max_norm`` clips the norm of the representation gradient.

    Args:
        max_norm: clip the norm of the aggregated shared gradient to this (official 1.0; 0: off).
        iterations: Newton iterations.
        update_every: recompute α every this many steps.

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import NashMTL
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> M = J @ J.T
        >>> a = NashMTL(max_norm=0.0).weights(M, torch.ones(2))  # no clipping: the bargaining solution
        >>> [round(v, 4) for v in a.tolist()]
        [1.8478, 1.3066]
        >>> [round(v, 4) for v in (M @ a * a).tolist()]  # Mα = 1/α
        [1.0, 1.0]
        >>> b = NashMTL(max_norm=0.0).weights(49 * M, torch.ones(2))  # gradients ×7: weights ÷7, same update
        >>> torch.allclose(b @ (7 * J), a @ J)
        True
        >>> w = NashMTL(max_norm=1.0).weights(M, torch.ones(2))  # the default clips ‖d‖ = √2 to 1
        >>> round(float((w @ J).norm()), 4)
        1.0
    """

    promises = GradientBalancer.promises | {"non_conflicting", "task_scale_invariant_direction"}

    def __init__(self, max_norm: float = 1.0, iterations: int = 20, update_every: int = 1,
                 mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if max_norm < 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0, got {max_norm}.")
        if update_every < 1:
            raise ValueError(f"NashMTL: update_every must be >= 1, got {update_every}.")
        self.max_norm = max_norm
        self.iterations = iterations
        self.update_every = update_every
        self.alpha: Optional[Tensor] = None
        self.steps = 0

    @property
    def scale_exponent(self) -> Optional[float]:
        return 0.0  # α → α/c: d and its (clipped) norm do not change

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.double()
        t = gramian.shape[0]
        if self.alpha is None or self.alpha.shape != (t,):
            self.alpha = torch.ones(t, dtype=torch.float64, device=gramian.device)
        alpha = self.alpha.to(gramian.device, torch.float64)
        if self.steps % self.update_every == 0:
            norm = torch.linalg.matrix_norm(gramian)
            root = norm.sqrt()
            # The normalised problem's warm start is the last α in its units (α̃ = α‖M‖^½).
            normalized = power_balance(gramian / norm.clamp_min(1e-300), 1.0, alpha * root, self.iterations)
            alpha = torch.where(norm > 0, normalized / root.clamp_min(1e-300), alpha)
        self.alpha = alpha
        self.steps += 1
        if self.max_norm > 0:
            norm = (alpha @ gramian @ alpha).clamp_min(0).sqrt()
            return alpha * (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return alpha

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.alpha = state_dict.get("alpha")
        self.steps = int(state_dict.get("steps", 0))
