"""GradNorm: learnable task weights that equalise gradient norms on the last shared layer."""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, task_positions
from mtl_lightning.core.engine import flatten_jacobian, task_jacobian


class GradNorm(LossWeighting):
    """Chen et al., ICML 2018 (arXiv 1711.02257).

    The model trains on Σ_t w_t L_t with learnable weights w (init 1). On the last shared layer W,
    G_t = ‖∇_W w_t L_t‖ and r_t = (L_t / L_t(0)) / mean_j(L_j / L_j(0)); the weights alone are
    trained on L_grad = Σ_t |G_t − stopgrad(mean(G)·r_t^α)| (in the module's optimizer, own parameter
    group), then renormalised to Σ_t w_t = T after every optimizer step. L_t(0) are the losses of the
    first training step (averaged over DDP ranks, saved in checkpoints).

    Args:
        alpha: α, the restoring-force strength (1.5 in the paper and LibMTL).
        lr: Learning rate of w (default: the model optimizer's).
        shared_layer: Name (relative to the encoder, e.g. ``"project.1"``) of the shared module whose
            parameters are W; default: the architecture's last shared layer (the module holding the
            last parameter shared by all tasks; for mixtures of experts, every expert's last layer).

    Examples:
        Two regression tasks; W is the encoder's last linear layer:

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.balancing import GradNorm
        >>> from mtl_lightning.data import CorrelatedRegressionDataModule
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MLP(8, (16,)), [RegressionTask("y1"), RegressionTask("y2")])
        >>> data = CorrelatedRegressionDataModule(dim=8, num_train=256, num_val=64, num_test=64, batch_size=64)
        >>> gradnorm = GradNorm(alpha=1.5)
        >>> pl.Trainer(callbacks=[gradnorm], max_epochs=2, barebones=True, accelerator="cpu").fit(model, data)
        >>> [round(w, 3) for w in gradnorm.weights.tolist()]
        [0.993, 1.007]
        >>> round(float(gradnorm.weights.sum()), 4)  # renormalised to Σ_t w_t = T after every step
        2.0
    """

    needs_whole_parameters: ClassVar[bool] = True  # the per-task gradients of the last shared layer

    def __init__(self, alpha: float = 1.5, lr: Optional[float] = None, shared_layer: Optional[str] = None) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"GradNorm: alpha must be >= 0, got {alpha}.")
        self.alpha = alpha
        self.shared_layer = shared_layer
        if lr is not None:
            self.parameter_group_options = {"lr": lr}
        self.weights: Optional[nn.Parameter] = None
        self.initial_losses: Optional[Tensor] = None

    def attach(self, task_names: list[str]) -> None:
        self.weights = self.register_parameters({"weights": nn.Parameter(torch.ones(len(task_names)))})["weights"]

    def layer_parameters(self, ctx: BalancingContext) -> list[nn.Parameter]:
        """W: the parameters of the configured shared layer, or the architecture's last shared layer."""
        named = ctx.named_shared_parameters()
        if not named:
            raise ValueError(
                f"GradNorm needs parameters shared by all tasks; {type(ctx.architecture).__name__} has none trainable."
            )
        if self.shared_layer is None:
            return ctx.last_shared_layer()
        chosen = [p for n, p in named if n.rpartition(".")[0] == self.shared_layer]
        if not chosen:
            layers = sorted({n.rpartition(".")[0] for n, _ in named})
            raise ValueError(f"GradNorm: shared_layer {self.shared_layer!r} holds no trainable shared parameter; choose from {layers}.")
        return chosen

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        assert self.weights is not None
        values, present = ctx.loss_vector()
        if self.initial_losses is None:
            self.initial_losses = values.detach().clone()
        else:  # a task first seen later (partially labelled data) gets its L(0) then
            self.initial_losses = torch.where(torch.isnan(self.initial_losses), values, self.initial_losses)
        positions = task_positions(losses, ctx.task_names)
        stacked = torch.stack(list(losses.values()))
        w = self.weights[positions]
        norms = flatten_jacobian(task_jacobian(list(losses.values()), self.layer_parameters(ctx))).norm(dim=1).detach()
        grad_norms = w * norms.to(w)
        ratios = (values / self.initial_losses.to(values))[positions].to(w)
        relative = ratios / ratios.mean()
        target = (grad_norms.mean() * relative**self.alpha).detach()
        gradnorm_loss = (grad_norms - target).abs().sum()
        return (w.detach() * stacked).sum() + gradnorm_loss, dict(zip(losses, w.detach()))

    def on_optimizer_step(self, ctx: BalancingContext) -> None:
        assert self.weights is not None
        with torch.no_grad():
            self.weights.mul_(len(self.weights) / self.weights.sum())

    def state_dict(self) -> dict[str, Any]:
        return {} if self.initial_losses is None else {"initial_losses": self.initial_losses.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_losses = state_dict["initial_losses"]
