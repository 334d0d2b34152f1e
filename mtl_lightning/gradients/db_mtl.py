"""DB-MTL: dual-balancing MTL (Lin et al., arXiv 2308.12029)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.core.engine import combine
from mtl_lightning.gradients.solvers import all_finite, reading_is_free


class DBMTL(GradientBalancer):
    """Gradients of log L_t, ĝ_t ← β_k ĝ_t + (1−β_k) ∇log L_t (ĝ = the first gradient at step 1,
    β_k = β/k^σ), d = Σ_t (max_s ‖ĝ_s‖/‖ĝ_t‖) ĝ_t.

    ∇log L_t = g_t/(L_t + 1e-8) is taken on the rank- and micro-batch-averaged loss, so DDP and
    accumulation give the single-process update. Param mode only (the moving average lives in
    parameter space). The moving averages are checkpointed.

    Args:
        beta: β (official 0.9).
        beta_sigma: σ (official 0).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import DBMTL
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
        >>> (d,), w = DBMTL().aggregate([J.clone()], None, losses, None, ctx=None)  # reads no context
        >>> [round(v, 4) for v in w.tolist()]  # ∇log L_t = g_t / L_t, scaled up to the largest norm
        [5.6569, 1.0]
        >>> [round(v, 4) for v in d.tolist()]
        [0.8284, 2.0]
    """

    supported_modes = ("param",)
    uses_gramian = False

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, mode: Optional[str] = None,
                 batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.average: Optional[list[Tensor]] = None
        self.steps = 0

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        # The blocks are this step's own buffers: turned into ∇log L_t in place (no T×P copies).
        inverse = 1.0 / (losses.to(jacobian[0].dtype) + 1e-8)
        if scale is not None:
            inverse = inverse / scale.to(inverse.dtype)
        log_grads = [block.mul_(inverse.view(-1, *([1] * (block.dim() - 1)))) for block in jacobian]
        self.steps += 1
        if self.average is None or self.steps == 1:
            self.average = log_grads
        else:
            self._update_average(log_grads, self.beta / self.steps**self.beta_sigma, scale is not None)
        norms = torch.linalg.vector_norm(torch.stack([_row_norms(a) for a in self.average]), dim=0)
        weights = norms.max() / (norms + 1e-8)
        scaled = weights if scale is None else weights * scale.to(weights.dtype)
        return combine(scaled, self.average), weights

    def _update_average(self, log_grads: list[Tensor], keep: float, may_overflow: bool) -> None:
        """ĝ ← keep·ĝ + (1 − keep)·∇log L, in place (one pass over the average).

        Under fp16 loss scaling a step may overflow (the optimizer then skips it); its gradients must
        not poison the average, so they are checked first, from their norms (finite iff every
        entry is). Without loss scaling a non-finite gradient is not skipped by the optimizer either
        (the NaN-loss check names the task), and the check, a full pass over J, is not made.
        """
        assert self.average is not None  # aggregate() sets it on the first step
        if may_overflow:
            norms = torch.stack([_row_norms(g) for g in log_grads]).sum(0)
            finite = all_finite(norms)
            if not reading_is_free(finite):  # neutralise the update instead of synchronising
                rate = torch.where(finite, torch.full_like(norms[0], 1 - keep), torch.zeros_like(norms[0]))
                for average, g in zip(self.average, log_grads):
                    average.lerp_(g.nan_to_num_(0.0, 0.0, 0.0), rate.to(g.dtype))
                return
            if not bool(finite):  # reading it is free: skip the update
                return
        for average, g in zip(self.average, log_grads):
            average.lerp_(g, 1 - keep)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.average = state_dict.get("average")
        self.steps = int(state_dict.get("steps", 0))


def _row_norms(block: Tensor) -> Tensor:
    """‖block[t]‖ for every t, without a squared temporary of the block's size."""
    return torch.linalg.vector_norm(block.reshape(block.shape[0], -1), dim=1)
