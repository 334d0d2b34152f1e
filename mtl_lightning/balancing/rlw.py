"""Random Loss Weighting (RLW)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting


class RLW(LossWeighting):
    """Lin et al., TMLR 2022 (arXiv 2111.10603): λ = softmax(ε), ε ~ N(0, I) redrawn every step,
    L = Σ λ_t L_t (LibMTL's default normal sampling).

    The draws come from the callback's own generator, seeded identically on every DDP rank (so the
    ranks agree on λ) and saved in checkpoints (so a resumed run draws the same sequence).

    Args:
        seed: Seed of the weight generator.

    Examples:
        On fixed losses (this method reads nothing from the context):

        >>> import torch
        >>> from mtl_lightning.balancing import RLW
        >>> losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
        >>> rlw = RLW(seed=0)
        >>> _, weights = rlw.combine(losses, ctx=None)
        >>> [round(float(w), 4) for w in weights.values()]
        [0.8623, 0.1377]
        >>> _, weights = rlw.combine(losses, ctx=None)  # a new draw every step
        >>> [round(float(w), 4) for w in weights.values()]
        [0.0602, 0.9398]
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        stacked = torch.stack(list(losses.values()))
        weights = torch.softmax(torch.randn(len(losses), generator=self.generator), dim=0).to(stacked)
        return (weights * stacked).sum(), dict(zip(losses, weights))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
