"""Smooth Tchebycheff scalarisation (STCH)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import (
    BalancingContext,
    LossWeighting,
    effective_weights,
    require_positive_losses,
    task_positions,
)
from mtl_lightning.balancing.history import EpochLossHistory

_EPS = 1e-20  # the official code's guard inside the log


class STCH(LossWeighting):
    """Lin et al., ICML 2024 (arXiv 2402.19078), as in the official STCH_MTL code.

    Epochs 0 … ``warmup_epochs`` train on Σ_t log L_t. The nadir point ẑ_t is the mean loss of
    epoch ``warmup_epochs`` (the last warm-up epoch). Afterwards
    L = T·μ·logsumexp_t(log(L_t/ẑ_t) / μ), a smooth maximum of the normalised log-losses: the task
    furthest above its nadir gets most of the weight. The nadir comes from losses averaged over DDP
    ranks and is saved in checkpoints. Needs positive losses.

    Args:
        mu: Smoothing μ (1.0 in the official code); μ → 0 gives the Tchebycheff maximum.
        warmup_epochs: Index of the last warm-up epoch (4 in the official code).

    Examples:
        After the warm-up, with nadir ẑ = (2, 0.5) recorded in epoch 0, the task furthest above its
        nadir (b: L_b/ẑ_b = 2) gets most of the weight:

        >>> import torch
        >>> from types import SimpleNamespace
        >>> from mtl_lightning.balancing import STCH
        >>> stch = STCH(mu=1.0, warmup_epochs=0)
        >>> stch.history.update(0, torch.tensor([2.0, 0.5]), torch.tensor([True, True]))
        >>> ctx = SimpleNamespace(epoch=1, task_names=["a", "b"])  # all combine reads after the warm-up
        >>> losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
        >>> total, weights = stch.combine(losses, ctx)
        >>> [round(float(w), 4) for w in weights.values()]
        [0.4, 1.6]
    """

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4) -> None:
        super().__init__()
        if not mu > 0:
            raise ValueError(f"STCH: mu must be > 0, got {mu}.")
        if warmup_epochs < 0:
            raise ValueError(f"STCH: warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.mu = mu
        self.warmup_epochs = warmup_epochs
        self.history = EpochLossHistory()
        self.nadir: Optional[Tensor] = None

    @staticmethod
    def _log_objective(values: Tensor) -> Tensor:
        return torch.log(values + _EPS).sum()

    def _stch_objective(self, nadir: Tensor) -> Any:
        def objective(values: Tensor) -> Tensor:
            normalised = torch.log(values / nadir + _EPS)
            return len(values) * self.mu * torch.logsumexp(normalised / self.mu, dim=0)

        return objective

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        require_positive_losses(self.name, losses)
        stacked = torch.stack(list(losses.values()))
        if ctx.epoch <= self.warmup_epochs:
            values, present = ctx.loss_vector()
            self.history.update(ctx.epoch, values, present)
            objective = self._log_objective
        else:
            if self.nadir is None:
                nadir = self.history.mean_of(self.warmup_epochs)
                if nadir is None:
                    raise RuntimeError(
                        f"STCH: no loss was recorded in warm-up epoch {self.warmup_epochs}, so the nadir point "
                        f"is unknown at epoch {ctx.epoch} (a resume from a checkpoint without STCH state?)."
                    )
                self.nadir = nadir.float()
            nadir = self.nadir.to(stacked)[task_positions(losses, ctx.task_names)]
            if not bool(torch.isfinite(nadir).all() and (nadir > 0).all()):
                raise ValueError(f"STCH: the nadir point {self.nadir.tolist()} has a task without a positive mean loss.")
            objective = self._stch_objective(nadir)
        return objective(stacked), effective_weights(objective, losses)

    def state_dict(self) -> dict[str, Any]:
        if self.history.epoch is None:
            return {}
        return {"history": self.history.state_dict(), "nadir": None if self.nadir is None else self.nadir.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])
        self.nadir = state_dict["nadir"]
