"""PCGrad: project each task gradient off the gradients it conflicts with (Yu et al., arXiv 2001.06782)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import Generator, GradientBalancer


class PCGrad(GradientBalancer):
    """For each i, for j in a random order: if g_i^PC·g_j < 0, g_i^PC −= (g_i^PC·g_j/‖g_j‖²) g_j; d = Σ_i g_i^PC.

    Computed on the Gramian: g_i^PC = Σ_k C_ik g_k, so every dot product is a row of C M and the
    update is d = Jᵀ(Σ_i C_i) — identical to the vector form, without touching the T×P Jacobian.
    The random orders come from a checkpointed generator (``seed``), identical on every DDP rank;
    each order includes i itself, as in the official code (a no-op: g_i^PC·g_i is never negative).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import PCGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = PCGrad(seed=0).weights(J @ J.T, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [2.0, 1.5]
        >>> d = w @ J  # (g_1 − (g_1·g_2/‖g_2‖²) g_2) + (g_2 − (g_2·g_1/‖g_1‖²) g_1)
        >>> [round(v, 4) for v in d.tolist()], [round(v, 4) for v in (J @ d).tolist()]
        ([0.5, 1.5], [0.5, 1.0])
    """

    # Each task draws its own random partner order: equivariant only in distribution.
    promises = GradientBalancer.promises - {"permutation_equivariant"}

    def __init__(self, seed: int = 0, mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        self.generator = Generator(seed)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        orders = torch.argsort(torch.rand((t, t), generator=self.generator.get(gramian.device), device=gramian.device), dim=1)
        # Everything indexed by (i, k) is gathered once; the loop over k is sequential by definition.
        partner_rows = gramian[orders].unbind(1)  # [k][i] = M[j_ik, :]
        partner_squares = gramian.diagonal().clamp_min(1e-30).take(orders).unbind(1)
        partner_onehots = torch.nn.functional.one_hot(orders, t).to(gramian.dtype).unbind(1)
        coeffs = torch.eye(t, dtype=gramian.dtype, device=gramian.device)
        for rows, squares, onehots in zip(partner_rows, partner_squares, partner_onehots):
            dots = (coeffs * rows).sum(1)  # g_i^PC · g_j for every i
            # Only conflicting pairs (negative dot product) are projected.
            coeffs.addcmul_((dots / squares).clamp_max(0).unsqueeze(1), onehots, value=-1)
        return coeffs.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.load(state_dict.get("generator"))
