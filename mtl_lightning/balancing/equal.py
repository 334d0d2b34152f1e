"""Equal weighting: the sum of the task losses (the default when no method is configured)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting


class EqualWeighting(LossWeighting):
    """L = Σ_t L_t — summed, not averaged, as in LibMTL and Nash-MTL.

    Examples:
        On fixed losses (this method reads nothing from the context):

        >>> import torch
        >>> from mtl_lightning.balancing import EqualWeighting
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> total, weights = EqualWeighting().combine(losses, ctx=None)
        >>> float(total), [float(w) for w in weights.values()]
        (2.5, [1.0, 1.0])

        In training it is the default; ``Trainer(callbacks=[EqualWeighting()])`` makes it explicit.
    """

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        total = torch.stack(list(losses.values())).sum()
        return total, {name: torch.ones((), device=total.device) for name in losses}
