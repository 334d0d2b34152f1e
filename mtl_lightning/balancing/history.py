"""Epoch-mean task losses: the history that DWA and STCH build their weights from.

Built from :meth:`BalancingContext.loss_vector` (losses averaged over DDP ranks), so every rank holds
the same history. An epoch's mean is finalised lazily, at the first step of the next epoch, which
makes the state independent of the order of epoch-end hooks and exact to checkpoint and resume.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


class EpochLossHistory:
    """Running per-task loss sums of the current epoch and the means of finished epochs (sized by
    the first update)."""

    def __init__(self) -> None:
        self.epoch: Optional[int] = None
        self.sums: Optional[Tensor] = None
        self.counts: Optional[Tensor] = None
        #: Mean loss of each finished epoch: ``{epoch: (T,) tensor}`` (NaN for a task never seen).
        self.means: dict[int, Tensor] = {}

    def update(self, epoch: int, losses: Tensor, present: Tensor) -> None:
        """Add one step's (T,) reduced losses; finalise the previous epoch when ``epoch`` moves on."""
        if self.sums is None or self.counts is None:
            self.sums = torch.zeros(len(losses), dtype=torch.float64)
            self.counts = torch.zeros(len(losses), dtype=torch.float64)
        if len(losses) != len(self.sums):
            raise ValueError(f"Loss history holds {len(self.sums)} tasks but got losses of {len(losses)} tasks.")
        if self.epoch is not None and epoch != self.epoch:
            self.means[self.epoch] = self.sums / self.counts  # 0/0 → NaN for an absent task
            self.sums = torch.zeros_like(self.sums)
            self.counts = torch.zeros_like(self.counts)
        self.epoch = epoch
        values = losses.detach().to("cpu", torch.float64)
        mask = present.detach().cpu()
        self.sums += torch.where(mask, values, torch.zeros_like(values))
        self.counts += mask.to(torch.float64)

    def mean_of(self, epoch: int) -> Optional[Tensor]:
        """Mean losses of ``epoch``: final if it is finished, running if it is the current one."""
        if epoch in self.means:
            return self.means[epoch]
        if epoch == self.epoch and self.sums is not None and self.counts is not None:
            return self.sums / self.counts
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sums": None if self.sums is None else self.sums.clone(),
            "counts": None if self.counts is None else self.counts.clone(),
            "means": {int(e): m.clone() for e, m in self.means.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.sums = None if state["sums"] is None else state["sums"].clone().to(torch.float64)
        self.counts = None if state["counts"] is None else state["counts"].clone().to(torch.float64)
        self.means = {int(e): m.clone().to(torch.float64) for e, m in state["means"].items()}
