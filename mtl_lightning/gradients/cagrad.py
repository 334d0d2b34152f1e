"""CAGrad: conflict-averse gradient descent (Liu et al., arXiv 2110.14048)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import cagrad_simplex_weights


class CAGrad(GradientBalancer):
    """w* = argmin_{w∈Δ} wᵀM1/T + c√(wᵀMw) with c = c_α‖g_0‖; d = (g_0 + c/‖g_w‖ g_w)/(1 + c_α²).

    Args:
        c: c_α, the radius of the ball around the average gradient, relative to ‖g_0‖ (0.4 in the
            official NYUv2 runs, 0.5 on the toy).
        rescale: divide d by 1 + c_α² (official ``rescale=1``).
        iterations: budget of Newton steps of the simplex solver (default 2T + 20).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import CAGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = CAGrad(c=0.4).weights(J @ J.T, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [0.6034, 0.431]
        >>> d, g0 = w @ J, J.mean(0)
        >>> round(float(((1 + 0.4**2) * d - g0).norm() / g0.norm()), 4)  # on the ball of radius c‖g_0‖
        0.4
    """

    def __init__(self, c: float = 0.4, rescale: bool = True, iterations: Optional[int] = None, mode: Optional[str] = None,
                 batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if c < 0:
            raise ValueError(f"CAGrad: c must be >= 0, got {c}.")
        self.c = c
        self.rescale = rescale
        self.iterations = iterations

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.double()
        t = gramian.shape[0]
        w = self._previous = cagrad_simplex_weights(gramian, self.c, self.iterations, self._previous)
        divisor = 1 + self.c**2 if self.rescale else 1.0
        g0_norm = (gramian.mean().clamp_min(0) + 1e-8).sqrt()
        gw_norm = (gramian @ w @ w).clamp_min(0).sqrt()
        lam = g0_norm / (gw_norm + 1e-8) * (self.c / divisor)
        return (lam * w).add_(1.0 / (t * divisor))  # (1/T + λw) / divisor
