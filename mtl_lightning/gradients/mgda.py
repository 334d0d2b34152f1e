"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun, arXiv 1810.04650)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import min_norm_simplex

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientBalancer):
    """d = Σ_t α_t g_t with α = argmin_{α∈Δ} ‖Σ α_t g_t/n_t‖², solved exactly (the official code
    approximates it by Frank–Wolfe; see :func:`~mtl_lightning.gradients.solvers.min_norm_simplex`).
    The weights act on the raw gradients g_t, as in the official code (which scales the losses by
    α). T = 2 uses the exact clipped closed form (the official 0.999 / 0.001 clamps are not
    reproduced).

    ``mode="rep"`` is MGDA-UB (the upper bound: gradients w.r.t. the shared representation).

    Args:
        normalization: gradient normaliser n_t used inside the min-norm problem: ``"none"`` (1),
            ``"l2"`` (‖g_t‖), ``"loss"`` (L_t) or ``"loss+"`` (L_t‖g_t‖), as in the official code.
        iterations: budget of active-set steps (default 2T + 4; the solution needs at most one step
            per task entering or leaving the support).
        mode: ``"param"`` or ``"rep"`` (MGDA-UB); see :class:`GradientBalancer`.
        batched: see :class:`GradientBalancer`.

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import MGDA
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = MGDA().weights(J @ J.T, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [0.6, 0.4]
        >>> d = w @ J  # the min-norm point of the hull: the same first-order progress on both tasks
        >>> [round(v, 4) for v in (J @ d).tolist()]
        [0.2, 0.2]
    """

    promises = GradientBalancer.promises | {"non_conflicting"}  # g_t·d ≥ ‖d‖² (the min-norm point of the hull)

    def __init__(self, normalization: str = "none", iterations: Optional[int] = None, mode: Optional[str] = None,
                 batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"MGDA: normalization={normalization!r}; choose one of {list(NORMALIZATIONS)}.")
        if iterations is not None and iterations < 1:
            raise ValueError(f"MGDA: iterations must be >= 1, got {iterations}.")
        self.normalization = normalization
        self.iterations = iterations

    def normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.normalization == "none":
            return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        if self.normalization == "loss":
            return losses.to(gramian.dtype).clamp_min(1e-12)
        norms = gramian.diagonal().clamp_min(0).sqrt()
        if self.normalization == "loss+":
            norms = losses.to(gramian.dtype) * norms
        return norms.clamp_min(1e-12)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.normalization != "none":
            n = self.normalizers(gramian, losses)
            gramian = gramian / torch.outer(n, n)
        self._previous = min_norm_simplex(gramian, self.iterations, self._previous)
        return self._previous
