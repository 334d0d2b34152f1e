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

    Computed on the Gramian like :class:`PCGrad`, all tasks i at once: the T − 1 partner steps are
    sequential, the tasks are not (at T = 2 each task has one partner: one step, no random order). A
    task whose gradient is zero is never a partner (the formula divides by ‖g_j‖; there is no
    direction to align with). Targets start at 0 and are checkpointed. Every pair's target follows
    φ_ij, as in the paper's algorithm and LibMTL (``LibMTL/weighting/GradVac.py``, 2025). As LibMTL's
    default (``GradVac_group_type=0``) the similarity is over all shared parameters at once; LibMTL's
    per-layer and per-matrix groups are not offered. LibMTL adds 1e-8 to the denominators; here a
    zero gradient is excluded instead (above).

    Args:
        beta: EMA rate of the similarity targets (LibMTL's default 0.5).
        seed: seed of the random pair order.

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import GradVac
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> gradvac = GradVac(beta=0.5)
        >>> w = gradvac.weights(J @ J.T, torch.ones(2))  # targets start at 0: PCGrad's projection
        >>> [round(v, 4) for v in w.tolist()]
        [2.0, 1.5]
        >>> w = gradvac.weights(J @ J.T, torch.ones(2))  # targets moved towards cos(g_1, g_2) < 0
        >>> [round(v, 4) for v in w.tolist()]
        [1.622, 1.311]
    """

    # Each task draws its own random partner order: equivariant only in distribution.
    promises = GradientBalancer.promises - {"permutation_equivariant"}

    def __init__(self, beta: float = 0.5, seed: int = 0, mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
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
        if t == 1:
            return torch.ones(1, dtype=dtype, device=device)
        # In units of the partner's norm: a = g_i^GV·ĝ_j (ĝ = g/‖g‖), s = ‖g_i^GV‖², τ = φ̂/√(1−φ̂²), the
        # paper's step is σ/‖g_j‖ with σ = max(τ√(s − a²) − a, 0), positive exactly when φ_ij = a/√s < φ̂_ij.
        squares = gramian.diagonal()
        inverse_norms = squares.rsqrt().nan_to_num_(posinf=0.0)  # 0 for a zero gradient
        if t == 2:
            return self._pair_weights(gramian, targets, squares, inverse_norms)
        order_keys = torch.rand((t, t), generator=self.generator.get(device), device=device)
        order_keys.diagonal().fill_(2.0)  # self last
        orders = torch.argsort(order_keys, dim=1)[:, : t - 1]  # (T, T−1): task i's partners in order
        partner_inverse_norms = inverse_norms.take(orders)
        pair_targets = targets.gather(1, orders)
        tangents = _tangents(pair_targets, partner_inverse_norms)
        cosines = gramian * inverse_norms * inverse_norms.unsqueeze(1)  # ĝ_j·ĝ_m
        projections = gramian * inverse_norms  # row i: g_i^GV·ĝ_m for every m
        own = squares.unsqueeze(1)  # s_i, updated in closed form (never in place)
        # Everything indexed by (i, k) is gathered once, as (T, 1) columns; the loop over k is sequential.
        columns = zip(orders.split(1, dim=1), cosines[orders].unbind(1), tangents.split(1, dim=1))
        seen, own_before, negative_steps = [], [], []
        for partners, partner_cosines, tangent in columns:
            a = projections.gather(1, partners)
            perpendicular = torch.addcmul(own, a, a, value=-1).clamp_min_(0).sqrt_()
            negative_step = torch.addcmul(a, tangent, perpendicular, value=-1).clamp_max_(0)  # −σ
            projections.addcmul_(negative_step, partner_cosines, value=-1)
            seen.append(a)
            own_before.append(own)
            own = torch.addcmul(own, negative_step, torch.add(negative_step, a, alpha=-2))  # s + 2σa + σ²
            negative_steps.append(negative_step)
        similarities = torch.cat(seen, 1) / torch.cat(own_before, 1).clamp_min(0).sqrt().clamp_min(1e-30)
        self.targets = targets.scatter(1, orders, self._updated_targets(pair_targets, similarities))
        steps = torch.cat(negative_steps, 1).mul_(partner_inverse_norms).reshape(-1)  # −σ/‖g_j‖
        return torch.ones(t, dtype=dtype, device=device).scatter_add_(0, orders.reshape(-1), steps.neg_())

    def _pair_weights(self, gramian: Tensor, targets: Tensor, squares: Tensor, inverse_norms: Tensor) -> Tensor:
        """T = 2: the partner loop of :meth:`weights` is one step for both tasks (j = 1 − i), computed
        on 2-vectors indexed by i (``squares``: ‖g_i‖², ``inverse_norms``: 1/‖g_i‖, 0 for a zero g_i)."""
        partner_inverse_norms = inverse_norms.flip(0)
        pair_targets = targets.flip(1).diagonal()  # (φ̂_01, φ̂_10)
        a = gramian[0, 1] * partner_inverse_norms  # g_i·ĝ_j
        perpendicular = torch.addcmul(squares, a, a, value=-1).clamp_min_(0).sqrt_()
        negative_steps = torch.addcmul(a, _tangents(pair_targets, partner_inverse_norms), perpendicular,
                                       value=-1).clamp_max_(0)  # −σ_i
        similarities = a / squares.clamp_min(0).sqrt().clamp_min(1e-30)
        self.targets = torch.diag(self._updated_targets(pair_targets, similarities)).flip(1)
        return 1 - (negative_steps * partner_inverse_norms).flip(0)  # task j gains σ_i/‖g_j‖

    def _updated_targets(self, pair_targets: Tensor, similarities: Tensor) -> Tensor:
        """φ̂ ← (1−β)φ̂ + βφ; a non-finite step (fp16 overflow, skipped by the optimizer) must not
        poison the targets."""
        updated = (1 - self.beta) * pair_targets + self.beta * similarities
        return torch.where(torch.isfinite(updated), updated, pair_targets)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "targets": self.targets, "generator": self.generator.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.targets = state_dict.get("targets")
        self.generator.load(state_dict.get("generator"))


def _tangents(pair_targets: Tensor, partner_inverse_norms: Tensor) -> Tensor:
    """τ = φ̂/√(1−φ̂²) of each pair, 0 where the partner's gradient is zero (never a partner)."""
    tangents = pair_targets / (1 - pair_targets.square()).clamp_min(0).sqrt().clamp_min(1e-30)
    return torch.where(partner_inverse_norms > 0, tangents, 0.0)
