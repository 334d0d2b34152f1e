"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun, arXiv 1810.04650)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import frank_wolfe_min_norm

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientBalancer):
    """d = Σ_t α_t g_t with α = argmin_{α∈Δ} ‖Σ α_t g_t/n_t‖² (Frank–Wolfe from the best pair).

    ``mode="rep"`` is MGDA-UB (the upper bound: gradients w.r.t. the shared representation).

    Args:
        normalization: gradient normaliser n_t used inside the min-norm problem: ``"none"`` (1),
            ``"l2"`` (‖g_t‖), ``"loss"`` (L_t) or ``"loss+"`` (L_t‖g_t‖), as in the official code.
        iterations: Frank–Wolfe iterations (official: at most 250).
        mode, batched: see :class:`GradientBalancer`.
    """

    def __init__(self, normalization: str = "none", iterations: int = 250, mode: Optional[str] = None,
                 batched: bool = True) -> None:
        super().__init__(mode, batched)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"MGDA: normalization={normalization!r}; choose one of {list(NORMALIZATIONS)}.")
        if iterations < 0:
            raise ValueError(f"MGDA: iterations must be >= 0, got {iterations}.")
        self.normalization = normalization
        self.iterations = iterations

    def normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        losses = losses.to(gramian.dtype)
        table = {"none": torch.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}
        return table[self.normalization].clamp_min(1e-12)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        n = self.normalizers(gramian, losses)
        return frank_wolfe_min_norm(gramian / torch.outer(n, n), self.iterations)
