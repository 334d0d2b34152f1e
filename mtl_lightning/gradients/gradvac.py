"""GradVac: gradient vaccine, pulling pairwise gradient similarity up to its running target (Wang et al., arXiv 2010.05874)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import Generator, GradientBalancer


class GradVac(GradientBalancer):
    """For each i, for j ≠ i in random order, with φ_ij = cos(g_i^GV, g_j) and target φ̂_ij:
    if φ_ij < φ̂_ij, g_i^GV += ‖g_i^GV‖(φ̂_ij√(1−φ_ij²) − φ_ij√(1−φ̂_ij²)) / (‖g_j‖√(1−φ̂_ij²)) g_j;
    then φ̂_ij ← (1−β)φ̂_ij + βφ_ij (every pair, as in the paper's Algorithm 1). d = Σ_i g_i^GV.

    Computed on the Gramian like :class:`PCGrad`. Targets start at 0 and are checkpointed.

    Args:
        beta: EMA rate of the similarity targets (LibMTL's default 0.5).
        seed: seed of the random pair order.
    """

    def __init__(self, beta: float = 0.5, seed: int = 0, mode: Optional[str] = None, batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.generator = Generator(seed)
        self.targets: Optional[Tensor] = None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        device, dtype = gramian.device, gramian.dtype
        if self.targets is None:
            self.targets = torch.zeros((t, t), dtype=dtype, device=device)
        targets = self.targets.to(device=device, dtype=dtype)
        order_keys = torch.rand((t, t), generator=self.generator.get(device), device=device)
        order_keys = order_keys.masked_fill(torch.eye(t, dtype=torch.bool, device=device), 2.0)  # self last
        orders = torch.argsort(order_keys, dim=1)[:, : t - 1]
        coeffs = torch.eye(t, dtype=dtype, device=device)
        rows = torch.arange(t, device=device)
        norms = gramian.diagonal().clamp_min(0).sqrt()
        for k in range(t - 1):
            j = orders[:, k]
            dots = (coeffs * gramian[:, j].T).sum(1)
            own_norms = ((coeffs @ gramian) * coeffs).sum(1).clamp_min(0).sqrt()
            cos = dots / (own_norms * norms[j]).clamp_min(1e-30)
            target = targets[rows, j]
            step = own_norms * (target * (1 - cos**2).clamp_min(0).sqrt() - cos * (1 - target**2).clamp_min(0).sqrt()) \
                / (norms[j] * (1 - target**2).clamp_min(0).sqrt()).clamp_min(1e-30)
            coeffs[rows, j] += torch.where(cos < target, step, torch.zeros_like(step))
            updated = (1 - self.beta) * target + self.beta * cos
            # A non-finite step (fp16 overflow, skipped by the optimizer) must not poison the targets.
            targets[rows, j] = torch.where(torch.isfinite(updated), updated, target)
        self.targets = targets
        return coeffs.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "generator": self.generator.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.targets = state_dict.get("targets")
        self.generator.load(state_dict.get("generator"))
