"""DB-MTL: dual-balancing MTL (Lin et al., arXiv 2308.12029)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.gradients.base import GradientBalancer


class DBMTL(GradientBalancer):
    """Gradients of log L_t, ĝ_t ← β_k ĝ_t + (1−β_k) ∇log L_t (ĝ = the first gradient at step 1,
    β_k = β/k^σ), d = Σ_t (max_s ‖ĝ_s‖/‖ĝ_t‖) ĝ_t.

    ∇log L_t = g_t/(L_t + 1e-8) is taken on the rank- and micro-batch-averaged loss, so DDP and
    accumulation give the single-process update. Param mode only (the moving average lives in
    parameter space). The moving averages are checkpointed.

    Args:
        beta: β (official 0.9).
        beta_sigma: σ (official 0).
    """

    supported_modes = ("param",)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, mode: Optional[str] = None,
                 batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.average: Optional[Tensor] = None
        self.steps = 0

    def aggregate(self, jacobian: Tensor, gramian: Tensor, losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[Tensor, Tensor]:
        unscaled = jacobian if scale is None else jacobian / scale.to(jacobian.dtype)
        log_grads = unscaled / (losses.to(jacobian.dtype) + 1e-8).unsqueeze(1)
        self.steps += 1
        if self.average is None or self.steps == 1:
            average = log_grads
        else:
            beta = self.beta / self.steps**self.beta_sigma
            average = log_grads + beta * (self.average.to(log_grads) - log_grads)
        if self.average is not None:
            # A non-finite step (fp16 overflow, skipped by the optimizer) must not poison the average.
            average = torch.where(torch.isfinite(average).all(), average, self.average.to(average))
        self.average = average
        norms = average.norm(dim=1)
        weights = norms.max() / (norms + 1e-8)
        direction = weights @ average
        return (direction if scale is None else direction * scale.to(direction.dtype)), weights

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = state_dict.get("average")
        self.steps = int(state_dict.get("steps", 0))
