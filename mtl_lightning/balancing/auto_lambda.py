"""Auto-λ: task weights learned by a one-step look-ahead on held-out data."""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Protocol, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext, LossWeighting, task_positions
from mtl_lightning.core.engine import unflatten_into

#: ‖θ± − θ‖ of the finite difference (the official ``eps = 0.01 / ‖d‖`` along d).
FINITE_DIFFERENCE_RADIUS = 0.01


class _BatchStream(Protocol):
    """What the data module's ``held_out_batches`` returns (``mtl_lightning.data.held_out.HeldOutBatches``)."""

    def batch(self, draw: int) -> Any: ...


class _LossesOf(nn.Module):
    """The model's own loss computation as a module call, so that ``torch.func.functional_call`` can
    evaluate it at other parameter values (θ', θ ± εv) without touching the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any, stage: str) -> dict[str, Tensor]:
        return self.model.compute_losses(batch, stage)[2]  # type: ignore[operator]


class AutoLambda(LossWeighting):
    """Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022
    (arXiv 2202.03091), following the official ``AutoLambda`` class (github.com/lorenmt/auto-lambda).

    The model trains on Σ_t λ_t L_t. Before each step, λ takes one step of its own Adam on the
    gradient of the primary tasks' loss on a held-out batch after a virtual SGD step on the training
    batch (a one-step look-ahead)::

        θ' = θ − α (μ·m + ∇_θ Σ_t λ_t L_t(θ) + wd·θ)          (α, μ, m, wd: the real optimizer's)
        ∇_λ L_val(θ') = −α ∇_θ L_t(θ) · d,    d = ∇_θ' Σ_{t ∈ primary} L_t^val(θ')

    with ∇_θ L_t · d by central finite differences at θ ± εd, ε = 0.01/‖d‖: each component is
    (L_t(θ + εd) − L_t(θ − εd)) / 2ε on the training batch (two forward passes, no backward).
    α is the learning rate of the parameter's optimizer group (the official code reads the scheduler's
    current one), μ·m the SGD momentum buffer where the group has ``momentum`` (0 for Adam), wd its
    weight decay. With every task primary (the default) this is multi-task learning ("total" in the
    paper); with a subset it is auxiliary learning: the other tasks keep a weight only as far as they
    help the primary ones.

    Held-out batches come from ``split`` of the data module (default ``"val"``; ``"train"`` draws a
    second, independently shuffled pass over the training data, as the official code's ``val_loader``
    does), made by the data module's ``held_out_batches``
    (:class:`~mtl_lightning.data.held_out.HeldOutBatches`): a stream of its own, seeded by ``seed``,
    sharded by rank, that leaves the training order and the global RNG alone. The loss of a
    held-out batch is the model's own ``compute_losses`` (stage ``"monitor"``: the tasks as they are,
    without loss multipliers or detached heads), evaluated at θ' with ``torch.func.functional_call``;
    the model's parameters are never modified in place, and the look-ahead forwards update copies of
    the buffers (batch-norm statistics), not the model's.

    λ and its Adam state live in this callback (Auto-λ has its own optimizer) and are saved in its
    checkpoint state with the number of held-out batches drawn. Under DDP the virtual step uses the
    gradient averaged over ranks (as the real step does), d is averaged too and so is the λ gradient:
    λ is identical on every rank, and N ranks equal one process on their union of samples.

    Differences from the official code; none changes λ's update in its setting (one optimizer group,
    no dropout, every parameter reached by a primary task):

    * the virtual step reuses the training step's forward pass (the official code runs it again);
    * the look-ahead forwards leave the model's batch-norm statistics alone (the official code's
      extra forwards on θ update them; training uses batch statistics, so only evaluation sees it);
    * with several parameter groups each parameter moves by its own group's α (the official code
      takes group 0's) — the finite difference is then taken along α⊙d, which for one group is the
      official θ ± εd and factor α;
    * the two finite-difference forwards draw the same dropout masks; a parameter the primary loss
      does not reach has d = 0 (the official code fails on it); d = 0 gives a zero λ gradient (the
      official code divides by zero);
    * a regularization term R(θ) of the architecture (soft sharing) enters the virtual step as it
      enters the real one. Gradient clipping does not (nor in the official code).

    Args:
        primary: The primary tasks (default: every task). The others are auxiliary.
        split: The data module's split of the held-out batches (``"val"``; any split it has).
        update_every: Update λ every this many optimizer steps (1 in the official code); with gradient
            accumulation λ is updated at the first micro-batch of the step, on that micro-batch.
        lr: Adam learning rate of λ: 1e-4 in the official NYUv2 runs, 3e-5 for Cityscapes, 3e-4 for
            CIFAR-100.
        weight_init: Initial λ_t (0.1 in the official code).
        batch_size: Held-out samples per rank and update (default: the data module's ``batch_size``,
            as the official code's).
        seed: Seed of the held-out batches' order.

    Examples:
        Two regression tasks, ``y1`` primary and ``y2`` auxiliary; the held-out batches come from the
        data module's validation split:

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.balancing import AutoLambda
        >>> from mtl_lightning.data import CorrelatedRegressionDataModule
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MLP(8, (16,)), [RegressionTask("y1"), RegressionTask("y2")],
        ...                         optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        >>> data = CorrelatedRegressionDataModule(dim=8, num_train=256, num_val=64, num_test=64, batch_size=64)
        >>> auto_lambda = AutoLambda(primary=["y1"], lr=0.01)
        >>> pl.Trainer(callbacks=[auto_lambda], max_epochs=2, barebones=True, accelerator="cpu").fit(model, data)
        >>> [round(w, 4) for w in auto_lambda.task_weights().tolist()]  # λ, from (0.1, 0.1)
        [0.131, 0.1779]
        >>> auto_lambda.held_out_draws  # one held-out batch per step (2 epochs × 4 steps)
        8
    """

    needs_whole_parameters: ClassVar[bool] = True  # the look-ahead step differentiates every parameter

    def __init__(
        self,
        primary: Optional[Sequence[str]] = None,
        split: str = "val",
        update_every: int = 1,
        lr: float = 1e-4,
        weight_init: float = 0.1,
        batch_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if primary is not None and (isinstance(primary, str) or not list(primary)):
            raise ValueError(f"AutoLambda: 'primary' must be a non-empty list of task names or None (all), got {primary!r}.")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"AutoLambda: 'update_every' must be an integer >= 1, got {update_every!r}.")
        if not lr > 0:
            raise ValueError(f"AutoLambda: 'lr' must be > 0, got {lr!r}.")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"AutoLambda: 'batch_size' must be an integer >= 1 or None, got {batch_size!r}.")
        if not isinstance(split, str) or not split:
            raise ValueError(f"AutoLambda: 'split' must name a split of the data module, got {split!r}.")
        self.primary = None if primary is None else list(primary)
        self.split = split
        self.update_every = update_every
        self.lr = lr
        self.weight_init = float(weight_init)
        self.batch_size = batch_size
        self.seed = seed
        self.weights: Optional[Tensor] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        #: Held-out batches drawn so far (the position in the held-out stream).
        self.held_out_draws = 0
        #: The optimizer step at which λ was last updated (-1: never).
        self.last_update_step = -1
        self._primary_tasks: list[str] = []
        self._held_out: Optional[_BatchStream] = None
        self._trainer: Optional[pl.Trainer] = None

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self, task_names: list[str]) -> None:
        primary = task_names if self.primary is None else self.primary
        unknown = sorted(set(primary) - set(task_names))
        if unknown:
            raise ValueError(f"AutoLambda: 'primary' names unknown task(s) {unknown}; the model's tasks are {task_names}.")
        self._primary_tasks = [t for t in task_names if t in primary]
        if self.weights is None:
            self._set_weights(torch.full((len(task_names),), self.weight_init))
        elif len(self.weights) != len(task_names):
            raise ValueError(f"AutoLambda: restored state has {len(self.weights)} task weights, the model has {len(task_names)} tasks.")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        datamodule = getattr(trainer, "datamodule", None)
        make = getattr(datamodule, "held_out_batches", None)
        if datamodule is None or not callable(make):
            found = "no data module" if datamodule is None else f"the data module {type(datamodule).__name__}, which has no held_out_batches()"
            raise ValueError(
                f"AutoLambda: split={self.split!r} names a split of the data module the held-out batches come from, "
                f"but the trainer has {found}; fit with a MultiTaskDataModule or MultiDatasetDataModule "
                "(trainer.fit(model, datamodule=...))."
            )
        try:
            self._held_out = make(self.split, self._primary_tasks, self.batch_size, self.seed)
        except ValueError as error:
            raise ValueError(f"AutoLambda: split={self.split!r}: {error}") from None
        self._trainer = trainer

    def _set_weights(self, weights: Tensor, optimizer_state: Optional[dict[str, Any]] = None) -> None:
        self.weights = weights.detach().clone().float().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.weights], lr=self.lr)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def _on_device(self, device: torch.device) -> Tensor:
        assert self.weights is not None and self.optimizer is not None
        if self.weights.device != device:
            self._set_weights(self.weights.to(device), self.optimizer.state_dict())
        return self.weights

    def task_weights(self) -> Tensor:
        """λ over all tasks (detached)."""
        assert self.weights is not None
        return self.weights.detach()

    @property
    def primary_tasks(self) -> list[str]:
        """The primary tasks, in the model's task order (known once attached)."""
        return list(self._primary_tasks)

    # -- the training objective -------------------------------------------------------------------
    def combine(self, losses: dict[str, Tensor], ctx: BalancingContext) -> tuple[Tensor, dict[str, Tensor]]:
        stacked = torch.stack(list(losses.values()))
        weights = self._on_device(stacked.device).detach()[task_positions(losses, ctx.task_names)].to(stacked.dtype)
        return (weights * stacked).sum(), dict(zip(losses, weights))

    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]:
        if ctx.global_step % self.update_every == 0 and ctx.global_step != self.last_update_step:
            self.update_weights(ctx)
            self.last_update_step = ctx.global_step
        return super().backward(ctx)

    # -- the λ update -------------------------------------------------------------------------------
    def update_weights(self, ctx: BalancingContext) -> None:
        """One Adam step of λ on :meth:`hypergradient` at the next held-out batch."""
        if self._held_out is None:
            raise RuntimeError("AutoLambda: no held-out batches; the callback was not set up for fitting.")
        params = [*ctx.shared_parameters(), *ctx.unshared_parameters()]
        device = params[0].device if params else next(iter(ctx.losses.values())).device
        held_out = move_data_to_device(self._held_out.batch(self.held_out_draws), device)
        self.held_out_draws += 1
        grad = self.hypergradient(ctx, held_out)
        weights = self._on_device(grad.device)
        assert self.optimizer is not None
        self.optimizer.zero_grad()
        weights.grad = grad.to(weights.dtype)
        self.optimizer.step()

    def hypergradient(self, ctx: BalancingContext, held_out: Any) -> Tensor:
        """∂/∂λ of the primary tasks' loss on ``held_out`` after the virtual step (see the class
        docstring), as a (T,) float32 vector over all tasks, identical on every rank."""
        model = ctx.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"AutoLambda evaluates the model at other parameter values; it needs an nn.Module, "
                            f"got {type(model).__name__}.")
        params = [*ctx.shared_parameters(), *ctx.unshared_parameters()]
        losses = ctx.losses
        positions = task_positions(losses, ctx.task_names)
        count = len(ctx.task_names)
        stacked = torch.stack(list(losses.values()))
        weights = self._on_device(stacked.device).detach()[positions].to(stacked.dtype)
        objective = (weights * stacked).sum()
        regularization = ctx.model.regularization()
        if regularization is not None:
            objective = objective + regularization
        grads = _zeros_for_none(torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True), params)
        grads = _rank_mean(ctx, grads)
        rates, virtual = self._virtual_step(params, grads)

        # d = ∇_θ' of the primary tasks' held-out loss at θ'
        evaluate = _LossesOf(model)
        held_out_losses = _losses_at(evaluate, params, virtual, held_out, "monitor")
        primary = [held_out_losses[t] for t in self._primary_tasks if t in held_out_losses]
        if primary:
            d = _zeros_for_none(torch.autograd.grad(torch.stack(primary).sum(), virtual, allow_unused=True), virtual)
        else:  # no labelled primary sample in this rank's held-out batch
            d = [torch.zeros_like(v) for v in virtual]
        d = _rank_mean(ctx, d)
        direction = [rate * g for rate, g in zip(rates, d)]  # α⊙d: dθ'/dλ_t = −α ∇L_t
        norm = torch.cat([v.reshape(-1).float() for v in direction]).norm() if direction else torch.zeros(())
        if not bool(torch.isfinite(norm)):
            raise FloatingPointError(
                f"AutoLambda: the look-ahead loss of the primary tasks {self._primary_tasks} on a held-out batch of "
                f"split '{self.split}' is not finite at step {ctx.global_step}; lower the model's learning rate."
            )
        local = torch.zeros(count, device=stacked.device, dtype=torch.float32)
        if float(norm) > 0:
            eps = FINITE_DIFFERENCE_RADIUS / float(norm)
            with torch.no_grad():
                shifted = [[p.detach() + sign * eps * v.to(p.dtype) for p, v in zip(params, direction)] for sign in (1, -1)]
                devices = [stacked.device] if stacked.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):  # the same dropout masks on both sides
                    plus = _losses_at(evaluate, params, shifted[0], ctx.batch, "train")
                minus = _losses_at(evaluate, params, shifted[1], ctx.batch, "train")
            both = [name for name in losses if name in plus and name in minus]
            differences = torch.stack([(plus[n] - minus[n]).float() / (2 * eps) for n in both]) if both else None
            if differences is not None:
                local[task_positions({n: plus[n] for n in both}, ctx.task_names)] = differences
        return -ctx.reduce_mean(local)

    def _virtual_step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[float], list[Tensor]]:
        """(α per parameter, θ' as new leaves): θ' = θ − α(μ·m + g + wd·θ) with each parameter's group
        of the real optimizer (a parameter it does not hold stays: α = 0)."""
        optimizer = self._model_optimizer()
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        rates, virtual = [], []
        for p, g in zip(params, grads):
            group = groups.get(id(p))
            theta = p.detach()
            if group is None:
                rates.append(0.0)
                virtual.append(theta.clone().requires_grad_(True))
                continue
            rate = float(group["lr"])
            step = g + float(group.get("weight_decay", 0.0) or 0.0) * theta
            if "momentum" in group:  # SGD with momentum: the official m = μ·buffer
                buffer = optimizer.state.get(p, {}).get("momentum_buffer")
                if buffer is not None:
                    step = step + float(group["momentum"]) * buffer
            rates.append(rate)
            virtual.append((theta - rate * step).requires_grad_(True))
        return rates, virtual

    def _model_optimizer(self) -> torch.optim.Optimizer:
        trainer = self._trainer
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) != 1:
            raise RuntimeError(f"AutoLambda takes the virtual step with the model's optimizer; found {len(optimizers)}.")
        return optimizers[0]

    # -- checkpoint state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.weights is None or self.optimizer is None:
            return {}
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {  # copies on the CPU; the live state stays untouched
            index: {k: v.detach().cpu().clone() if isinstance(v, Tensor) else v for k, v in state.items()}
            for index, state in optimizer_state["state"].items()
        }
        return {"weights": self.weights.detach().cpu().clone(), "optimizer": optimizer_state,
                "held_out_draws": self.held_out_draws, "last_update_step": self.last_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_weights(state_dict["weights"], state_dict["optimizer"])
        self.held_out_draws = int(state_dict["held_out_draws"])
        self.last_update_step = int(state_dict["last_update_step"])


def _zeros_for_none(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _rank_mean(ctx: BalancingContext, tensors: list[Tensor]) -> list[Tensor]:
    """The mean over DDP ranks of each tensor, in one all-reduce (identity on one process)."""
    if ctx.world_size <= 1 or not tensors:
        return tensors
    flat = ctx.reduce_mean(torch.cat([t.reshape(-1).float() for t in tensors]))
    return [part.to(t.dtype) for part, t in zip(unflatten_into(flat, tensors), tensors)]


def _losses_at(evaluate: _LossesOf, params: Sequence[Tensor], values: Sequence[Tensor], batch: Any,
               stage: str) -> dict[str, Tensor]:
    """The model's task losses on ``batch`` with ``params`` replaced by ``values`` (and the buffers by
    copies, so that batch-norm statistics of the look-ahead do not reach the model)."""
    names = {id(p): name for name, p in evaluate.named_parameters()}
    substitutes: dict[str, Tensor] = {names[id(p)]: v for p, v in zip(params, values)}
    substitutes.update({name: b.clone() for name, b in evaluate.named_buffers()})
    return torch.func.functional_call(evaluate, substitutes, (batch, stage))
