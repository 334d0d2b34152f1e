"""Dynamic Weight Average (DWA)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, task_positions
from mtl_lightning.balancing.history import EpochLossHistory


class DWA(LossWeighting):
    """Liu, Johns & Davison, CVPR 2019 (arXiv 1803.10704).

    r_t = L̄_t(e−1) / L̄_t(e−2) on epoch-mean training losses, λ = T·softmax(r / τ), L = Σ λ_t L_t;
    λ = 1 during the first two epochs. Epoch means are built from the losses averaged over DDP
    ranks (identical state on every rank) and saved in checkpoints.

    Args:
        temperature: τ (2.0 in the official code).

    Examples:
        The weights from the recorded epoch-mean losses (in training, ``combine`` records them):

        >>> import torch
        >>> from mtl_lightning.balancing import DWA
        >>> dwa = DWA(temperature=2.0)
        >>> both = torch.tensor([True, True])
        >>> dwa.history.update(0, torch.tensor([1.0, 1.0]), both)  # epoch 0
        >>> dwa.history.update(1, torch.tensor([0.5, 1.0]), both)  # epoch 1: task a halved its loss
        >>> dwa.history.update(2, torch.tensor([0.5, 1.0]), both)  # the first step of epoch 2 closes epoch 1
        >>> [round(w, 4) for w in dwa.task_weights(1, ["a", "b"]).tolist()]  # epochs 0 and 1: λ = 1
        [1.0, 1.0]
        >>> [round(w, 4) for w in dwa.task_weights(2, ["a", "b"]).tolist()]  # the slower task b gains
        [0.8756, 1.1244]

        From the command line:
        ``mtl-lightning fit --config experiments/multidigits/ew.yaml --trainer.callbacks+=mtl_lightning.balancing.DWA``.
    """

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DWA: temperature must be > 0, got {temperature}.")
        self.temperature = temperature
        self.history = EpochLossHistory()

    def task_weights(self, epoch: int, task_names: list[str]) -> Tensor:
        """λ over all tasks for ``epoch`` from the recorded epoch means."""
        previous, before = self.history.means.get(epoch - 1), self.history.means.get(epoch - 2)
        if epoch < 2 or previous is None or before is None:
            return torch.ones(len(task_names))
        ratio = previous / before
        if not bool(torch.isfinite(ratio).all()):
            bad = [n for n, r in zip(task_names, ratio.tolist()) if not math.isfinite(r)]
            raise ValueError(
                f"DWA: task(s) {bad} have no finite loss ratio between epochs {epoch - 2} and {epoch - 1} "
                "(no labelled sample in a whole epoch, or a zero loss); DWA needs every task every epoch."
            )
        return len(task_names) * torch.softmax(ratio.float() / self.temperature, dim=0)

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        values, present = ctx.loss_vector()
        self.history.update(ctx.epoch, values, present)
        stacked = torch.stack(list(losses.values()))
        weights = self.task_weights(ctx.epoch, ctx.task_names).to(stacked)[task_positions(losses, ctx.task_names)]
        return (weights * stacked).sum(), dict(zip(losses, weights))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()} if self.history.epoch is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])
