"""Geometric loss strategy (GLS)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, effective_weights, require_positive_losses


class GLS(LossWeighting):
    """Chennupati et al., CVPR-W 2019 (arXiv 1904.08492): L = (Π_t L_t)^{1/T}, the geometric mean.

    Computed as exp(mean_t log L_t) (same value, no under/overflow of the product). The effective
    weight of task t is L / (T·L_t): inversely proportional to the task's own loss, so the balance
    does not depend on the losses' scales. Needs positive losses. No hyperparameters.

    Examples:
        On fixed losses (this method reads nothing from the context):

        >>> import torch
        >>> from mtl_lightning.balancing import GLS
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> total, weights = GLS().combine(losses, ctx=None)
        >>> round(float(total), 4), [round(float(w), 4) for w in weights.values()]  # √(2·0.5); L/(T·L_t)
        (1.0, [0.25, 1.0])
    """

    @staticmethod
    def _objective(values: Tensor) -> Tensor:
        return torch.exp(torch.log(values).mean())

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        require_positive_losses(self.name, losses)
        total = self._objective(torch.stack(list(losses.values())))
        return total, effective_weights(self._objective, losses)
