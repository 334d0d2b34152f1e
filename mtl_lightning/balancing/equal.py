"""Equal weighting: the sum of the task losses (the default when no method is configured)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting


class EqualWeighting(LossWeighting):
    """L = Σ_t L_t — summed, not averaged, as in LibMTL and Nash-MTL.

    Example::

        trainer = Trainer(callbacks=[EqualWeighting()])
    """

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        total = torch.stack(list(losses.values())).sum()
        return total, {name: torch.ones((), device=total.device) for name in losses}
