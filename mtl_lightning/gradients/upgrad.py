"""UPGrad: unconflicting projection of gradients (Quinton & Rey, arXiv 2406.16232; TorchJD)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import dual_cone_weights


class UPGrad(GradientBalancer):
    """Project every g_i onto the dual cone {x : Jx ≥ 0} and average the projections.

    As in TorchJD: the Gramian is normalised by its trace (zero if below ``norm_eps``) and regularised
    with ``reg_eps``·I; projection i is Jᵀv_i with v_i = argmin vᵀMv s.t. v ≥ e_i; weights = mean_i v_i.

    Args:
        norm_eps: Trace below which the Gramian counts as zero (TorchJD's default 1e-4).
        reg_eps: Regularisation ``reg_eps``·I added to the normalised Gramian (TorchJD's default 1e-4).
        iterations: budget of active-set steps of the T box-constrained QPs (default 2T + 4).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import UPGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = UPGrad().weights(J @ J.T, torch.ones(2))
        >>> [round(v, 3) for v in w.tolist()]
        [1.0, 0.75]
        >>> bool((J @ (w @ J) >= 0).all())  # no task's loss increases to first order
        True
    """

    promises = GradientBalancer.promises | {"non_conflicting"}

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4, iterations: Optional[int] = None,
                 mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"UPGrad: norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}.")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.iterations = iterations

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        trace = gramian.trace()
        normalized = torch.where(trace >= self.norm_eps, gramian / trace.clamp_min(1e-30), torch.zeros_like(gramian))
        regularized = normalized + self.reg_eps * torch.eye(t, dtype=gramian.dtype, device=gramian.device)
        self._previous = dual_cone_weights(regularized, self.iterations, self._previous)
        return self._previous.mean(0)
