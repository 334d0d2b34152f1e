"""Uncertainty weighting (UW): learnable homoscedastic task uncertainty."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, task_positions


class UW(LossWeighting):
    """Kendall, Gal & Cipolla, CVPR 2018 (arXiv 1705.07115):
    L = Σ_t ½ e^{−s_t} L_t + ½ s_t with learnable s_t = log σ_t².

    The effective weight of task t is ½ e^{−s_t}; at the optimum of s_t it equals 1 / (2 L_t), so
    a task whose loss is 1000× larger gets a 1000× smaller weight.

    Args:
        init_log_variance: s_0. 0.0 follows Nash-MTL's code; LibMTL starts at −0.5.
        lr: Learning rate of s (default: the model optimizer's).

    Examples:
        Two regression tasks; the log-variances s live in the model (checkpointed, DDP-synchronised):

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.balancing import UW
        >>> from mtl_lightning.data import CorrelatedRegressionDataModule
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MLP(8, (16,)), [RegressionTask("y1"), RegressionTask("y2")])
        >>> data = CorrelatedRegressionDataModule(dim=8, num_train=256, num_val=64, num_test=64, batch_size=64)
        >>> uw = UW(lr=0.1)
        >>> pl.Trainer(callbacks=[uw], max_epochs=2, barebones=True, accelerator="cpu").fit(model, data)
        >>> # the weights ½e^{−s_t} move from 0.5 towards 1/(2L_t); these losses are below 1
        >>> [round(w, 3) for w in (0.5 * torch.exp(-uw.log_variance)).tolist()]
        [1.099, 1.084]

        A ready-made config: ``mtl-lightning fit --config experiments/multidigits/uw.yaml``.
    """

    def __init__(self, init_log_variance: float = 0.0, lr: Optional[float] = None) -> None:
        super().__init__()
        self.init_log_variance = init_log_variance
        if lr is not None:
            self.parameter_group_options = {"lr": lr}
        self.log_variance: Optional[nn.Parameter] = None

    def attach(self, task_names: list[str]) -> None:
        self.log_variance = self.register_parameters({"log_variance": nn.Parameter(torch.full((len(task_names),), float(self.init_log_variance)))})["log_variance"]

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert self.log_variance is not None
        s = self.log_variance[task_positions(losses, ctx.task_names)]
        values = torch.stack(list(losses.values()))
        precision = 0.5 * torch.exp(-s)
        total = (precision * values + 0.5 * s).sum()
        return total, dict(zip(losses, precision.detach()))
