"""FairGrad: α-fair resource allocation among the tasks (Ban & Ji, arXiv 2402.15638)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import power_balance, warm_start


class FairGrad(GradientBalancer):
    """w > 0 with M w = w^(−1/α); d = Σ_t w_t g_t (α = 1 is Nash-MTL's bargaining condition).

    The official code solves the system with scipy's ``least_squares`` from w = 1/T; here Newton
    iterations in torch, warm-started from the last step's solution (the solution is unique).

    Args:
        alpha: the fairness degree α (2.0 in the official runs).
        iterations: Newton iterations.
        max_norm: optionally clip the norm of the aggregated gradient (0: off).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import FairGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> M = J @ J.T
        >>> w = FairGrad(alpha=2.0).weights(M, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [2.1741, 1.4958]
        >>> [round(v, 4) for v in (M @ w * w ** 0.5).tolist()]  # M w = w^(−1/α)
        [1.0, 1.0]
    """

    def __init__(self, alpha: float = 2.0, iterations: int = 30, max_norm: float = 0.0, mode: Optional[str] = None,
                 batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if alpha <= 0:
            raise ValueError(f"FairGrad: alpha must be > 0, got {alpha}.")
        if max_norm < 0:
            raise ValueError(f"FairGrad: max_norm must be >= 0, got {max_norm}.")
        self.alpha = alpha
        self.iterations = iterations
        self.max_norm = max_norm

    promises = GradientBalancer.promises | {"non_conflicting"}  # g_t·d = w_t^(−1/α) > 0

    @property
    def scale_exponent(self) -> Optional[float]:
        """M → c²M gives w → c^(−2α/(1+α))w, so d → c^((1−α)/(1+α))d (Nash-MTL's 0 at α = 1); none when clipped."""
        return (1 - self.alpha) / (1 + self.alpha) if self.max_norm == 0 else None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        start = torch.full((t,), 1.0 / t, dtype=torch.float64, device=gramian.device)
        w = self._previous = power_balance(gramian, self.alpha, warm_start(self._previous, start), self.iterations)
        if self.max_norm > 0:
            norm = (w @ gramian @ w).clamp_min(0).sqrt()
            w = w * (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return w
