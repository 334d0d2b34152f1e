"""Fast Adaptive Multitask Optimization (FAMO)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, require_positive_losses, task_positions


class FAMO(LossWeighting):
    """Liu et al., NeurIPS 2023 (arXiv 2306.03792), following the official ``FAMO`` class.

    With z = softmax(ξ) and D_t = L_t − L_t* + ε, the model trains on Σ_t z_t log D_t / c with
    c = stopgrad(Σ_t z_t / D_t) (effective weight z_t / (c·D_t)). After each optimizer step the
    losses of the same batch are recomputed without gradient, δ_t = log D_t(before) − log D_t(after),
    ξ.grad = J_softmax(ξ)ᵀ δ, and ξ takes one Adam step (learning rate ``lr``, weight decay γ).

    ξ and its Adam state live in this callback (FAMO has its own optimizer) and are saved in its
    checkpoint state. δ comes from losses averaged over DDP ranks, so ξ stays identical on every rank.

    Args:
        gamma: γ, Adam weight decay on ξ: 1e-3 in the official NYUv2 / QM9 / CelebA runs, 1e-2 on
            Cityscapes, 0 on the two-objective toy.
        lr: Learning rate of ξ (0.025 in the official code).
        min_losses: L_t* per task name (default 0; tasks not listed get 0). Losses must stay above it.
        epsilon: ε (1e-8 in the official code).

    Examples:
        Two regression tasks; ξ and its Adam state live in the callback:

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.balancing import FAMO
        >>> from mtl_lightning.data import CorrelatedRegressionDataModule
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MLP(8, (16,)), [RegressionTask("y1"), RegressionTask("y2")])
        >>> data = CorrelatedRegressionDataModule(dim=8, num_train=256, num_val=64, num_test=64, batch_size=64)
        >>> famo = FAMO(gamma=1e-3)
        >>> pl.Trainer(callbacks=[famo], max_epochs=2, barebones=True, accelerator="cpu").fit(model, data)
        >>> z = famo.task_weights()  # softmax(ξ), from (0.5, 0.5)
        >>> [round(w, 3) for w in z.tolist()], round(float(z.sum()), 4)
        ([0.583, 0.417], 1.0)
    """

    def __init__(
        self,
        gamma: float = 1e-3,
        lr: float = 0.025,
        min_losses: Optional[dict[str, float]] = None,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        if gamma < 0 or not lr > 0:
            raise ValueError(f"FAMO: gamma must be >= 0 and lr > 0, got gamma={gamma}, lr={lr}.")
        self.gamma = gamma
        self.lr = lr
        self.min_losses = dict(min_losses or {})
        self.epsilon = epsilon
        self.logits: Optional[Tensor] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._min_vector: Optional[Tensor] = None
        self._before: Optional[tuple[Tensor, Tensor]] = None

    def attach(self, task_names: list[str]) -> None:
        self.check_task_keys("min_losses", self.min_losses, task_names)
        self._min_vector = torch.tensor([float(self.min_losses.get(n, 0.0)) for n in task_names])
        if self.logits is None:
            self._set_logits(torch.zeros(len(task_names)))
        elif len(self.logits) != len(task_names):
            raise ValueError(f"FAMO: restored state has {len(self.logits)} task logits, the model has {len(task_names)} tasks.")

    def _set_logits(self, logits: Tensor, optimizer_state: Optional[dict[str, Any]] = None) -> None:
        self.logits = logits.detach().clone().float().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def _on_device(self, device: torch.device) -> Tensor:
        assert self.logits is not None and self.optimizer is not None and self._min_vector is not None
        if self.logits.device != device:
            self._set_logits(self.logits.to(device), self.optimizer.state_dict())
            self._min_vector = self._min_vector.to(device)
        return self._min_vector

    def task_weights(self) -> Tensor:
        """z = softmax(ξ) over all tasks."""
        assert self.logits is not None
        return torch.softmax(self.logits.detach(), dim=0)

    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        stacked = torch.stack(list(losses.values())).float()
        min_losses = self._on_device(stacked.device)
        positions = task_positions(losses, ctx.task_names)
        require_positive_losses(self.name, losses, {n: float(min_losses[i]) for n, i in zip(losses, positions)})
        z = self.task_weights()[positions]
        gaps = stacked - min_losses[positions] + self.epsilon
        c = (z / gaps).sum().detach()
        self._before = ctx.loss_vector()
        return (z * torch.log(gaps) / c).sum(), dict(zip(losses, (z / (c * gaps)).detach()))

    def on_optimizer_step(self, ctx: BalancingContext) -> None:
        if self._before is None or self.logits is None or self.optimizer is None:
            return
        before, present_before = self._before
        after, present_after = ctx.loss_vector(ctx.recompute_losses())
        min_losses = self._on_device(before.device)
        both = present_before & present_after
        delta = torch.log(before - min_losses + self.epsilon) - torch.log(after - min_losses + self.epsilon)
        delta = torch.where(both, delta, torch.zeros_like(delta)).to(self.logits)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.logits, dim=0), self.logits, grad_outputs=delta)
        self.optimizer.zero_grad()
        self.logits.grad = grad
        self.optimizer.step()
        self._before = None

    def state_dict(self) -> dict[str, Any]:
        if self.logits is None or self.optimizer is None:
            return {}
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {  # copies on the CPU; the live state stays untouched
            index: {k: v.detach().cpu().clone() if isinstance(v, Tensor) else v for k, v in state.items()}
            for index, state in optimizer_state["state"].items()
        }
        return {"logits": self.logits.detach().cpu().clone(), "optimizer": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_logits(state_dict["logits"], state_dict["optimizer"])
