"""DualProj: the mean gradient projected onto the dual cone of the task gradients (TorchJD; GEM's Eq. 11)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import dual_cone_projection


class DualProj(GradientBalancer):
    """d = the projection of the mean gradient Jᵀ(1/T) onto the dual cone {x : Jx ≥ 0}: d = Jᵀv with
    v = argmin vᵀMv s.t. v ≥ 1/T (Proposition 1 of Quinton & Rey, arXiv 2406.16232; the projection of
    Lopez-Paz & Ranzato's GEM, NeurIPS 2017, Eq. 11, applied to the average of the task gradients).

    As TorchJD's ``DualProj`` (there is no other official code): the Gramian is normalised by its
    trace (zero if below ``norm_eps``) and regularised with ``reg_eps``·I; the quadratic program is
    solved by the active-set method in torch (TorchJD calls quadprog on the host). Where the mean
    gradient conflicts with no task, it is the update; elsewhere the closest direction that does not.

    Args:
        norm_eps: Trace below which the Gramian counts as zero (TorchJD's default 1e-4).
        reg_eps: Regularisation ``reg_eps``·I added to the normalised Gramian (TorchJD's default 1e-4).
        iterations: budget of active-set steps (default 2T + 4).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): their mean (0, ½) conflicts
        with none, so it is the update; with g_2 = (−2, 1) the mean (−½, ½) hurts task 1 and is projected.

        >>> import torch
        >>> from mtl_lightning.gradients import DualProj
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> [round(v, 3) for v in DualProj(reg_eps=0.0).weights(J @ J.T, torch.ones(2)).tolist()]
        [0.5, 0.5]
        >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> w = DualProj(reg_eps=0.0).weights(J @ J.T, torch.ones(2))
        >>> [round(v, 3) for v in w.tolist()], [round(v, 3) + 0.0 for v in (w @ J).tolist()]
        ([1.0, 0.5], [0.0, 0.5])
    """

    promises = GradientBalancer.promises | {"non_conflicting"}

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4, iterations: Optional[int] = None,
                 mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"DualProj: norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}.")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.iterations = iterations
        self._previous: Optional[Tensor] = None  # warm start of the solver (speed only)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.double()
        t = gramian.shape[0]
        trace = gramian.trace()
        normalized = torch.where(trace >= self.norm_eps, gramian / trace.clamp_min(1e-30), torch.zeros_like(gramian))
        regularized = normalized + self.reg_eps * torch.eye(t, dtype=gramian.dtype, device=gramian.device)
        mean = torch.full((1, t), 1.0 / t, dtype=gramian.dtype, device=gramian.device)
        self._previous = dual_cone_projection(regularized, mean, self.iterations, self._previous)
        return self._previous[0]
