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
        orders = torch.argsort(order_keys, dim=1)[:, : t - 1]  # (T, T−1): task i's partners in order
        # Everything indexed by (i, k) is gathered once; the loop over k is sequential by definition.
        partner_rows = gramian[orders].unbind(1)  # [k][i] = M[j_ik, :]
        partner_norms = gramian.diagonal().clamp_min(0).sqrt()[orders]
        pair_targets = targets.gather(1, orders)
        target_roots = (1 - pair_targets**2).clamp_min(0).sqrt()
        partner_onehots = torch.nn.functional.one_hot(orders, t).to(dtype).unbind(1)
        # Per partner k: ‖g_j‖, ‖g_j‖², φ̂, √(1−φ̂²) and ‖g_j‖√(1−φ̂²), sliced once.
        columns = zip(partner_rows, partner_onehots, partner_norms.unbind(1), partner_norms.square().unbind(1),
                      pair_targets.unbind(1), target_roots.unbind(1),
                      (partner_norms * target_roots).clamp_min(1e-30).unbind(1))
        coeffs = torch.eye(t, dtype=dtype, device=device)  # row i: g_i^GV = Σ_m coeffs[i, m] g_m
        own_squares = gramian.diagonal().clone()  # ‖g_i^GV‖², updated in closed form
        similarities = []
        for rows, onehots, norm_j, square_j, target, root, denominator in columns:
            dots = torch.linalg.vecdot(coeffs, rows)  # g_i^GV · g_j
            own = own_squares.clamp_min(0).sqrt()
            cos = dots / (own * norm_j).clamp_min(1e-30)
            sin = (1 - cos.square()).clamp_min(0).sqrt()
            step = torch.addcmul(target * sin, cos, root, value=-1).mul_(own).div_(denominator)
            step = torch.where(cos < target, step, 0.0)
            coeffs.addcmul_(step.unsqueeze(1), onehots)
            own_squares.addcmul_(step, torch.addcmul(2 * dots, step, square_j))  # + 2·step·dots + step²‖g_j‖²
            similarities.append(cos)
        updated = (1 - self.beta) * pair_targets + self.beta * torch.stack(similarities, 1) if t > 1 else pair_targets
        # A non-finite step (fp16 overflow, skipped by the optimizer) must not poison the targets.
        self.targets = targets.scatter(1, orders, torch.where(torch.isfinite(updated), updated, pair_targets))
        return coeffs.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "generator": self.generator.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.targets = state_dict.get("targets")
        self.generator.load(state_dict.get("generator"))
