"""Fixed task weights: the weighted joint loss Σ_t α_t L_t."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting


class StaticWeighting(LossWeighting):
    """L = Σ_t α_t L_t with fixed α (tasks not listed get ``default``).

    Args:
        weights: α per task name, e.g. ``{"left": 1.0, "right": 0.5}``.
        default: α of tasks not in ``weights``.

    Examples:
        On fixed losses (this method reads nothing from the context):

        >>> import torch
        >>> from mtl_lightning.balancing import StaticWeighting
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> total, weights = StaticWeighting({"b": 4.0}).combine(losses, ctx=None)
        >>> float(total), [float(w) for w in weights.values()]
        (4.0, [1.0, 4.0])
    """

    def __init__(self, weights: dict[str, float], default: float = 1.0) -> None:
        super().__init__()
        bad = {k: v for k, v in weights.items() if not v >= 0}
        if bad:
            raise ValueError(f"StaticWeighting: weights must be >= 0, got {bad}.")
        self.weights = dict(weights)
        self.default = default

    def attach(self, task_names: list[str]) -> None:
        self.check_task_keys("weights", self.weights, task_names)

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        alphas = {n: torch.tensor(self.weights.get(n, self.default)) for n in losses}
        total = torch.stack([alphas[n].to(l) * l for n, l in losses.items()]).sum()
        return total, alphas
