"""Nash-MTL: the Nash bargaining solution of the tasks (Navon et al., arXiv 2202.01017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import power_balance


class NashMTL(GradientBalancer):
    """α > 0 with M̃α = 1/α, M̃ = M/‖M‖_F; d = Jᵀα, its norm clipped to ``max_norm``.

    Solved by damped Newton iterations in torch (the official code runs ≤ 20 convex iterations of
    cvxpy/ECOS); warm-started from the previous step's α (checkpointed). With ``update_every`` > 1
    the weights are recomputed every that many optimizer steps and reused in between (official
    ``update_weights_every``).

    T = 2 is solved in closed form: α_1 = √(‖g_2‖ / (‖g_1‖(‖g_1‖‖g_2‖ + g_1·g_2))), and
    symmetrically α_2.
    Exactly opposite gradients (a Pareto-stationary point) have no positive solution: the iterations
    then grow α along the direction where Σ α_t g_t = 0, so the update is ≈ 0 (the official code
    keeps the previous α when cvxpy fails). In rep mode ``max_norm`` clips the norm of the
    representation gradient.

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
        [3.0055, 2.1252]
        >>> [round(v, 4) for v in ((M / M.norm()) @ a * a).tolist()]  # M̃α = 1/α
        [1.0, 1.0]
        >>> w = NashMTL(max_norm=1.0).weights(M, torch.ones(2))  # the default clips ‖d‖ to 1
        >>> round(float((w @ J).norm()), 4)
        1.0
    """

    def __init__(self, max_norm: float = 1.0, iterations: int = 20, update_every: int = 1,
                 mode: Optional[str] = None, batched: bool = True) -> None:
        super().__init__(mode, batched)
        if max_norm < 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0, got {max_norm}.")
        if update_every < 1:
            raise ValueError(f"NashMTL: update_every must be >= 1, got {update_every}.")
        self.max_norm = max_norm
        self.iterations = iterations
        self.update_every = update_every
        self.alpha: Optional[Tensor] = None
        self.steps = 0

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.double()
        t = gramian.shape[0]
        if self.alpha is None:
            self.alpha = torch.ones(t, dtype=torch.float64, device=gramian.device)
        alpha = self.alpha.to(gramian.device, torch.float64)
        if self.steps % self.update_every == 0:
            normalized = gramian / torch.linalg.matrix_norm(gramian).clamp_min(1e-30)
            alpha = power_balance(normalized, 1.0, alpha, self.iterations)  # keeps alpha where it fails
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
