"""Scale-invariant (log) loss."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, require_positive_losses


class SI(LossWeighting):
    """Scale-invariant loss L = Σ_t log L_t (the "SI" baseline of Navon et al., Nash-MTL,
    arXiv 2202.01017). Multiplying a task's loss by a constant adds a constant to L, so its
    gradient is unchanged: the effective weight of task t is 1 / L_t. Needs positive losses.

    Examples:
        On fixed losses (this method reads nothing from the context):

        >>> import torch
        >>> from mtl_lightning.balancing import SI
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> total, weights = SI().combine(losses, ctx=None)
        >>> round(float(total), 4), [float(w) for w in weights.values()]  # log 2 + log 0.5; 1/L_t
        (0.0, [0.5, 2.0])
    """

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        require_positive_losses(self.name, losses)
        values = torch.stack(list(losses.values()))
        return torch.log(values).sum(), dict(zip(losses, 1.0 / values.detach()))
