"""CR-MOGM: the weights of any weighting, smoothed by an exponential moving average across steps
(Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.mgda import MGDA
from mtl_lightning.gradients.solvers import all_finite

SCHEDULES = ("constant", "lr")

#: The properties of a wrapped method that its smoothed weights keep: each holds for every step's
#: weights λ̂ (a permutation of the tasks permutes them, their sum is positive), so for their
#: average. Conflict-freeness and per-task scale invariance hold for λ̂_k on the current Jacobian
#: only, not for the average of the past steps' weights applied to it.
KEPT_PROPERTIES = frozenset({"permutation_equivariant", "single_task_gradient", "identical_gradients"})


class CRMOGM(GradientBalancer):
    """λ_k = α λ_{k−1} + (1 − α) λ̂_k, d = Jᵀλ_k: the weights λ̂_k of any weighting (MGDA by
    default), averaged exponentially across steps.

    The paper shows that stochastic gradient manipulation (MGDA, PCGrad, CAGrad…) need not converge
    because its weights are a function of the instantaneous mini-batch gradients alone, and fixes it by
    this average (CR-MOGM). No official code of the paper is public that we know of;
    TorchJD's ``CRMOGMWeighting`` is the reference this class is tested against: λ_0 = λ̂_1 (the
    first step's weights are the wrapped method's), α = 0.9 by default, weights of any scale (the
    average of, e.g., PCGrad's).

    The wrapped method must be a *weighting* (its update is Jᵀw for w = ``weights(M, L)``): a
    method that aggregates J itself (GradDrop, DB-MTL) has no weights to average. CRMOGM runs in the
    wrapped method's mode, gradient path (``batched``) and Gramian use; its state is λ_{k−1} plus the
    wrapped method's own (random generators, warm starts), both checkpointed. Every DDP rank
    aggregates the same global Jacobian (param mode) or Gramian (rep mode), so λ is identical on every
    rank. λ advances once per optimizer step: in rep mode under gradient accumulation every
    micro-batch m uses α λ_{k−1} + (1 − α) λ̂^(m) and λ_k averages λ̂ over the step's micro-batches.
    A step whose λ̂ is not finite (an fp16 overflow, which the optimizer skips) leaves λ unchanged.

    The paper's Corollary 1, as TorchJD's documentation reads it, lets α_k start near 0 and grow
    towards 1 as the learning rate η_k decays (TorchJD suggests α_k = 1 − η_k/η_0).
    ``schedule="lr"`` does that: α_k = 1 − (1 − α)·η_k/η_0, with η_k the current learning rate of
    the shared parameters' optimizer group and η_0 its LR scheduler's base rate (``initial_lr``;
    η_k/η_0 is clipped to [0, 1]). ``alpha=0`` gives TorchJD's suggestion, α_k = 1 − η_k/η_0; without a scheduler the rate
    is constant and so is α. The rate is read from the Trainer at each training batch; outside a
    Trainer, set ``alpha`` between steps instead.

    Promises: the wrapped method's permutation equivariance, single-task and identical-gradient
    properties (they hold for every average of its weights); not its conflict-freeness or per-task
    scale invariance (the average of past steps' weights, applied to the current J, keeps neither).
    The class declares those of the default, MGDA; an instance, those of the method it wraps.

    Args:
        method: the wrapped weighting (default ``MGDA()``; the paper analyses MGDA, PCGrad and
            CAGrad). From YAML: ``method: {class_path: mtl_lightning.gradients.PCGrad, init_args: {seed: 1}}``.
        alpha: α ∈ [0, 1], the weight of the past (0: the wrapped method unchanged; 1: λ frozen at
            λ̂_1). TorchJD's default 0.9.
        schedule: ``"constant"`` (α) or ``"lr"`` (α_k follows the learning rate, see above).
        mode: the mode of the default MGDA (``"rep"``: CR-MGDA-UB); with a ``method``, None or that
            method's own (CRMOGM always runs in its method's mode).
        batched: likewise, the default MGDA's ``batched`` (see :class:`GradientBalancer`).
        engine: likewise, the default MGDA's ``engine`` (see :class:`GradientBalancer`).

    Examples:
        MGDA's weights on two successive steps' gradients, and their average (α = 0.5): the first
        step's weights are MGDA's own.

        >>> import torch
        >>> from mtl_lightning.gradients import CRMOGM, MGDA
        >>> first = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> second = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> method = CRMOGM(MGDA(), alpha=0.5)
        >>> [round(v, 4) for v in method.weights(first @ first.T, torch.ones(2)).tolist()]
        [0.6, 0.4]
        >>> [round(v, 4) for v in MGDA().weights(second @ second.T, torch.ones(2)).tolist()]
        [0.8, 0.2]
        >>> [round(v, 4) for v in method.weights(second @ second.T, torch.ones(2)).tolist()]
        [0.7, 0.3]

        Only weightings can be wrapped:

        >>> from mtl_lightning.gradients import DBMTL
        >>> CRMOGM(DBMTL())
        Traceback (most recent call last):
        ...
        ValueError: CRMOGM averages the weights of a weighting, and DBMTL is not one: it aggregates the Jacobian itself (it overrides aggregate). Wrap a weighting (MGDA, PCGrad, UPGrad…).
    """

    # Those of the default MGDA that hold for averaged weights (KEPT_PROPERTIES); set per instance.
    promises = MGDA.promises & KEPT_PROPERTIES

    def __init__(self, method: Optional[GradientBalancer] = None, alpha: float = 0.9, schedule: str = "constant",
                 mode: Optional[str] = None, batched: Optional[bool] = None, engine: Optional[str] = None) -> None:
        if method is None:
            method = MGDA(mode=mode, batched=True if batched is None else batched,
                          engine="jacobian" if engine is None else engine)
        elif not isinstance(method, GradientBalancer):
            raise ValueError(f"CRMOGM wraps a gradient weighting (a GradientBalancer such as MGDA), got "
                             f"{type(method).__name__}.")
        else:
            for option, value, own in (("mode", mode, method.mode), ("batched", batched, method.batched),
                                       ("engine", engine, method.engine)):
                if value is not None and value != own:
                    raise ValueError(f"CRMOGM runs as the method it wraps: {option}={value!r}, but {method.name} has "
                                     f"{option}={own!r}. Set it on {method.name}.")
        _check_is_weighting(method)
        super().__init__(method.mode, method.batched, method.engine)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CRMOGM: alpha must be in [0, 1], got {alpha}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"CRMOGM: schedule={schedule!r}; choose one of {list(SCHEDULES)}.")
        self.method = method
        self.alpha = float(alpha)
        self.schedule = schedule
        self.uses_gramian = method.uses_gramian
        # An instance promises what its own method promises and the average keeps (the class attribute
        # states the default's, for the registry's property suite, which builds CRMOGM()).
        self.promises = type(method).promises & KEPT_PROPERTIES  # type: ignore[misc]  # a ClassVar elsewhere
        #: λ_{k−1}, the smoothed weights of the last optimizer step (None before the first).
        self.smoothed: Optional[Tensor] = None
        self._pending: Optional[Tensor] = None  # Σ λ̂ over the micro-batches of a rep-mode step
        self._lr_ratio: Optional[float] = None  # η_k/η_0, read at each training batch (schedule="lr")

    @property
    def scale_exponent(self) -> Optional[float]:
        # A common rescaling c of every step's gradients rescales every λ̂ (so λ) as the method's law says.
        return self.method.scale_exponent

    # -- Lightning hooks: the wrapped method is set up with CRMOGM, which the Trainer calls --------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.method.setup(trainer, pl_module, stage)

    def on_optimizer_step(self, ctx: BalancingContext) -> None:
        self.method.on_optimizer_step(ctx)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.schedule == "lr":
            self._lr_ratio = _learning_rate_ratio(trainer, pl_module)

    # -- the weights -----------------------------------------------------------------------------
    def current_alpha(self) -> float:
        """α of this step: ``alpha``, or with ``schedule="lr"`` 1 − (1 − α)·η_k/η_0."""
        if self.schedule == "constant":
            return self.alpha
        if self._lr_ratio is None:
            raise ValueError(
                "CRMOGM: schedule='lr' reads the learning rate from the Trainer at each training batch, and none "
                "was read (the method runs outside a Trainer). Use schedule='constant' and set alpha between steps.")
        return 1.0 - (1.0 - self.alpha) * min(1.0, max(0.0, self._lr_ratio))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """λ_k of one optimizer step (the wrapped method's weights, averaged)."""
        return self._smooth(self.method.weights(gramian, losses), last=True, count=1)

    def step_weights(self, gramian: Tensor, losses: Tensor, ctx: BalancingContext) -> Tensor:
        raw = self.method.weights(gramian, losses)
        # The Jacobian engine's param mode aggregates once per optimizer step; rep mode and the Gramian
        # engine once per micro-batch.
        per_microbatch = self.mode == "rep" or self.engine == "gramian"
        count = int(getattr(ctx, "accumulate_grad_batches", 1)) if per_microbatch else 1
        return self._smooth(raw, last=bool(getattr(ctx, "is_last_microbatch", True)), count=count)

    def _smooth(self, raw: Tensor, last: bool, count: int) -> Tensor:
        """α λ_{k−1} + (1 − α) λ̂ for one micro-batch; λ_k is committed at the step's last one (λ̂
        averaged over the step's ``count`` micro-batches)."""
        alpha = self.current_alpha()
        if self.smoothed is None:
            previous = raw
        else:
            if self.smoothed.shape != raw.shape:
                raise ValueError(f"CRMOGM: the number of tasks changed from {self.smoothed.shape[0]} to "
                                 f"{raw.shape[0]}; the smoothed weights belong to another model.")
            previous = self.smoothed.to(device=raw.device, dtype=raw.dtype)
            previous = torch.where(all_finite(previous), previous, raw)  # no usable past: start from λ̂
        weights = alpha * previous + (1.0 - alpha) * raw
        if count > 1:
            self._pending = raw.clone() if self._pending is None else self._pending + raw
            if not last:
                return weights
            committed = alpha * previous + (1.0 - alpha) * (self._pending / count)
            self._pending = None
        else:
            committed = weights
        # A non-finite λ̂ (an fp16 overflow step, skipped by the optimizer) leaves λ as it was.
        self.smoothed = torch.where(all_finite(committed), committed, previous)
        return weights

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "method": self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.smoothed = state_dict.get("smoothed")
        self._pending = None
        self.method.load_state_dict(state_dict.get("method", {}))


def _check_is_weighting(method: GradientBalancer) -> None:
    """Raise where ``method`` aggregates J itself instead of weighting the task gradients."""
    cls = type(method)
    if cls.aggregate is not GradientBalancer.aggregate:
        raise ValueError(
            f"CRMOGM averages the weights of a weighting, and {method.name} is not one: it aggregates the Jacobian "
            "itself (it overrides aggregate). Wrap a weighting (MGDA, PCGrad, UPGrad…).")
    if cls.step_weights is not GradientBalancer.step_weights:
        raise ValueError(
            f"CRMOGM averages the weights of a weighting, and {method.name} is not one: its weights depend on the "
            "step's context (it overrides step_weights). Wrap a weighting (MGDA, PCGrad, UPGrad…).")
    if cls.weights is GradientBalancer.weights:
        raise ValueError(f"CRMOGM averages the weights of a weighting, and {method.name} defines no weights.")


def _learning_rate_ratio(trainer: Any, pl_module: Any) -> float:
    """η_k/η_0 of the optimizer group holding the shared parameters (η_0: the LR scheduler's
    ``initial_lr``, else the current rate)."""
    shared = {id(p) for p in pl_module.shared_parameters()}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if any(id(p) in shared for p in group["params"]):
                lr = float(group["lr"])
                initial = float(group.get("initial_lr", group["lr"]))
                return lr / initial if initial > 0 else 1.0
    raise ValueError("CRMOGM: schedule='lr' found no optimizer group with the shared parameters.")
