"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, task_positions


class IMTLL(LossWeighting):
    """IMTL-L, Liu et al., ICLR 2021 ("Towards Impartial Multi-task Learning"):
    L = Σ_t (e^{s_t} L_t − s_t) with learnable s_t (LibMTL's IMTL loss part).

    The effective weight is e^{s_t}; minimising over s_t drives e^{s_t} L_t → 1, so every task's
    scaled loss stays at the same level whatever its original scale.

    Args:
        init_scale: s_0 (0.0 in the official code).
        lr: Learning rate of s (default: the model optimizer's).

    Examples:
        Two regression tasks; the scales s live in the model (checkpointed, DDP-synchronised):

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.balancing import IMTLL
        >>> from mtl_lightning.data import CorrelatedRegressionDataModule
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MLP(8, (16,)), [RegressionTask("y1"), RegressionTask("y2")])
        >>> data = CorrelatedRegressionDataModule(dim=8, num_train=256, num_val=64, num_test=64, batch_size=64)
        >>> imtl = IMTLL(lr=0.1)
        >>> pl.Trainer(callbacks=[imtl], max_epochs=2, barebones=True, accelerator="cpu").fit(model, data)
        >>> # the weights e^{s_t} move from 1 towards 1/L_t; these losses are below 1
        >>> [round(w, 3) for w in torch.exp(imtl.log_scale).tolist()]
        [2.198, 2.167]
    """

    def __init__(self, init_scale: float = 0.0, lr: Optional[float] = None) -> None:
        super().__init__()
        self.init_scale = init_scale
        if lr is not None:
            self.parameter_group_options = {"lr": lr}
        self.log_scale: Optional[nn.Parameter] = None

    def attach(self, task_names: list[str]) -> None:
        self.log_scale = self.register_parameters({"log_scale": nn.Parameter(torch.full((len(task_names),), float(self.init_scale)))})["log_scale"]

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert self.log_scale is not None
        s = self.log_scale[task_positions(losses, ctx.task_names)]
        values = torch.stack(list(losses.values()))
        scale = torch.exp(s)
        total = (scale * values - s).sum()
        return total, dict(zip(losses, scale.detach()))
