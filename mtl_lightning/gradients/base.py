"""The base class of gradient balancing methods: engine call, DDP averaging, AMP scale, ``.grad`` writing.

A gradient method only decides how T task gradients become one direction. Following TorchJD, the
decision is split from its application: most methods are a *weighting* — a function of the T×T
Gramian M = JJᵀ (and the task losses) returning weights w, applied as d = Jᵀw — and the few that
need J itself (GradDrop, DB-MTL) override :meth:`GradientBalancer.aggregate`.

Semantics shared by every method (see the README, "Gradient balancing methods"):

* **Shared** means shared by every task, as the model's architecture declares it
  (``mtl_lightning.architectures``). Heads and the tasks' own architecture parts receive their
  task's unweighted gradient ∂L_t/∂θ_t (as TorchJD and LibMTL do for heads); mixing parameters
  (cross-stitch units, gates between tasks) the unweighted sum Σ_t ∂L_t/∂θ.
* **param mode**: J w.r.t. the shared parameters. Under gradient accumulation J (and the head
  gradients and losses) are averaged over the micro-batches and aggregated once, at the optimizer
  step. Under DDP they are averaged over ranks with one explicit all-reduce first, so every rank
  aggregates the same global J — the update one process computes on the union batch.
* **rep mode**: J w.r.t. the shared representation z (MGDA-UB). Each micro-batch is aggregated on
  its own (z differs between micro-batches); under DDP the Gramian is the global one (local Gramians
  all-reduced), the direction for z is applied locally through the encoder, and the resulting
  parameter gradients are averaged over ranks like in param mode.
* **fp16 loss scaling**: gradients are computed on S·L (no underflow); methods see M of the
  unscaled J/S; the final gradient is written back ×S, so ``unscale_`` and the inf/NaN skip of the
  optimizer step work unchanged.
* **Gramian engine** (``engine="gramian"``, param mode, methods whose update is Jᵀw with w a function
  of the Gramian and the losses): the T×P Jacobian is never held. One vmapped backward accumulates
  M = JJᵀ parameter by parameter (:func:`~mtl_lightning.core.engine.per_task_gramian`), and one more
  backward applies Σ_t w_t ∂L_t/∂θ. Peak memory is then about one parameter tensor's T rows instead
  of T×P, for one extra backward. Aggregation follows rep mode: each micro-batch on its own, with the
  Gramian averaged over DDP ranks (the mean of the ranks' Gramians, not the Gramian of their mean J).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Optional, cast

import torch
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext, BalancingMethod
from mtl_lightning.core.engine import (
    EmbeddingLookups,
    combine,
    cross_gramian,
    gramian,
    per_task_gradients,
    per_task_gramian,
    representation_backward,
)

MODES = ("param", "rep")
#: How param mode obtains the Gramian: from the materialised T×P Jacobian, or streamed without it.
ENGINES = ("jacobian", "gramian")

#: The properties of its paper's update that a gradient method may promise (:attr:`GradientBalancer.promises`),
#: each checked for every registered method by ``tests/test_method_properties.py``.
PROPERTIES: dict[str, str] = {
    "permutation_equivariant": "permuting the tasks permutes the weights (and leaves the update unchanged)",
    "single_task_gradient": "with one task the update is a positive multiple of its gradient",
    "identical_gradients": "T identical gradients give a positive multiple of their common direction",
    "non_conflicting": "no task's loss increases to first order: g_t·d ≥ 0 for every t (linearly independent g_t)",
    "task_scale_invariant_direction": "rescaling each task's gradient by its own c_t > 0 leaves the direction of d unchanged",
}


class GradientBalancer(BalancingMethod):
    """A balancing method that combines the per-task gradients of every step.

    Args:
        mode: ``"param"`` (Jacobian w.r.t. the shared parameters) or ``"rep"`` (w.r.t. the shared
            representation: one encoder backward, T head backwards; MGDA-UB's approximation).
        batched: Compute the T encoder backward passes of param mode as one vmapped backward
            (``is_grads_batched``), falling back to a loop where autograd cannot batch. Ignored (a loop)
            for architectures with a forward pass per task (:meth:`batched_for`).
        engine: ``"jacobian"`` (default): param mode holds the T×P Jacobian of the shared parameters, which
            every method can use, aggregated once per optimizer step on the Jacobian averaged over
            micro-batches and ranks. ``"gramian"``: param mode never holds it (see the module docstring):
            for methods that weight the Gramian (:attr:`weights_from_gramian`), when T×P does not fit in
            memory, at the cost of one more backward per step.
    """

    needs_all_tasks_per_step: ClassVar[bool] = True
    needs_whole_parameters: ClassVar[bool] = True
    #: The modes the method supports; the first is the default.
    supported_modes: ClassVar[tuple[str, ...]] = MODES
    #: False for methods that aggregate J without its Gramian (they get ``gramian=None``): the
    #: Gramian is a full pass over the T×P Jacobian. A class default; an instance may set its own.
    uses_gramian: bool = True
    #: The properties of :data:`PROPERTIES` the method's paper promises (a method lacking one says why
    #: where it removes it); the method registry's property suite checks each.
    promises: ClassVar[frozenset[str]] = frozenset(
        {"permutation_equivariant", "single_task_gradient", "identical_gradients"})
    #: True for a method whose weights need the task Jacobians of two independent sample sets (MoDo's
    #: double sampling). In param mode with a shared representation the engine then splits each
    #: micro-batch by sample parity (``per_task_gradients(sample_splits=2)``, no extra forward), and the
    #: method gets J = J₀ + J₁ (the whole batch) and, in place of the Gramian, A = (2J₀)(2J₁)ᵀ: each
    #: half's mean-loss gradient estimate, so E[A] = E[J]E[J]ᵀ for independent halves. Without a shared
    #: representation (features by task) the halves cannot be told apart after the forward: A = JJᵀ.
    double_sampling: ClassVar[bool] = False

    def __init__(self, mode: Optional[str] = None, batched: bool = True, engine: str = "jacobian") -> None:
        super().__init__()
        mode = self.supported_modes[0] if mode is None else mode
        if mode not in self.supported_modes:
            raise ValueError(
                f"{self.name}: mode={mode!r} is not supported; choose one of {list(self.supported_modes)}."
            )
        if engine not in ENGINES:
            raise ValueError(f"{self.name}: engine={engine!r} is not one of {list(ENGINES)}.")
        if engine == "gramian" and mode != "param":
            raise ValueError(f"{self.name}: engine='gramian' is for param mode; rep mode's Jacobian is w.r.t. the "
                             "shared representation and never holds the T×P parameter Jacobian.")
        if engine == "gramian" and not batched:
            raise ValueError(f"{self.name}: engine='gramian' streams the Gramian out of one vmapped backward; it "
                             "needs batched=True (or use engine='jacobian').")
        self.mode = mode
        self.batched = bool(batched)
        self.engine = engine
        self._buffer: Optional[list[Tensor]] = None
        self._last_weights: Optional[Tensor] = None
        #: The last step's solution of an iterative solver (MGDA, CAGrad, UPGrad, FairGrad), from which
        #: the next step's solve starts: it changes the last bits of the answer, so it is checkpointed.
        self._previous: Optional[Tensor] = None
        self._warned_no_split = False
        #: The shared embedding tables' lookups, recorded for the Gramian engine (set up with the model).
        self._lookups: Optional[EmbeddingLookups] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        arch = pl_module.architecture
        self._check_engine(arch)
        if self.engine == "gramian":
            if self._lookups is not None:
                self._lookups.remove()
            self._lookups = EmbeddingLookups(arch, pl_module.shared_parameters())
        if self.mode not in arch.supported_modes:
            raise ValueError(
                f"{self.name}: mode={self.mode!r} needs a shared representation, which {type(arch).__name__} does not "
                f"have; it supports mode(s) {list(arch.supported_modes)}."
            )
        if not pl_module.shared_parameters():
            raise ValueError(
                f"{self.name} arbitrates the parameters shared by all tasks, and {type(arch).__name__} has none "
                "trainable (frozen, or each task has its own). Use a loss-weighting method (e.g. EqualWeighting)."
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._lookups is not None:
            self._lookups.remove()
            self._lookups = None

    @property
    def scale_exponent(self) -> Optional[float]:
        """k such that rescaling every task gradient by c > 0 rescales the update by c^k (the paper's
        scaling law: 1 for a weighting invariant to a common scale, 0 for an update that does not
        change); None where the method has no such law."""
        return 1.0

    # -- what a method implements ---------------------------------------------------------------
    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Weights w (T,) of the task gradients from the Gramian of the *unscaled* gradients and the
        (rank-averaged) task losses. The update is Σ_t w_t g_t."""
        raise NotImplementedError

    def step_weights(self, gramian: Tensor, losses: Tensor, ctx: BalancingContext) -> Tensor:
        """This step's weights; :meth:`weights` by default. A method that also needs the step's context
        (micro-batch position, e.g. to smooth weights over steps) overrides this rather than
        :meth:`aggregate`, and keeps the Gramian engine."""
        return self.weights(gramian, losses)

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        """The direction and the effective weight of each task.

        ``jacobian`` is a list of blocks ``(T, *shape)`` (one per shared parameter in param mode, the
        representation in rep mode), ×``scale`` under fp16 loss scaling; the direction is one tensor
        of ``shape`` per block, in the same (scaled) space. The blocks belong to this step and may be
        modified in place. Default: d = Jᵀw with w = :meth:`step_weights`.
        """
        # None only where the method sets uses_gramian = False: its weights() does not read the Gramian
        w = self.step_weights(cast(Tensor, gramian), losses, ctx)
        return combine(w, jacobian), w

    @property
    def weights_from_gramian(self) -> bool:
        """Whether the update is Jᵀw with w a function of the Gramian and the losses only (not of J
        itself, nor of two sample halves): what ``engine="gramian"`` needs."""
        return type(self).aggregate is GradientBalancer.aggregate and self.uses_gramian and not self.double_sampling

    # -- the contract ---------------------------------------------------------------------------
    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]:
        names = list(ctx.task_names)
        missing = [n for n in names if n not in ctx.losses]
        if missing:
            raise ValueError(
                f"{self.name} needs the loss of every task at every step, but task(s) {missing} have no "
                "labelled sample in this micro-batch. Use batches where every task is labelled, or a "
                "loss-weighting method."
            )
        scale = ctx.loss_scale
        losses = [ctx.losses[n] for n in names]
        loss_vector = torch.stack(losses).detach().float()
        scaled = [l * scale for l in losses] if scale is not None else losses
        shared = ctx.shared_parameters()
        unshared = ctx.unshared_parameters()
        if self.engine == "gramian":
            self._gramian_engine_step(ctx, scaled, loss_vector, scale, shared, unshared)
            return self._weights_by_task(names)
        splits = 2 if self._splits_samples(ctx) else 1
        with ctx.no_sync():
            head_inputs = None if ctx.head_inputs is None else [ctx.head_inputs.get(n) for n in names]
            jacobian, unshared_grads = per_task_gradients(scaled, ctx.features, shared, unshared, self.mode,
                                                          self.batched_for(ctx), head_inputs, sample_splits=splits)
        # The aggregation is float32/float64 math: keep autocast (fp16 matmuls overflow) out of it.
        with torch.autocast(loss_vector.device.type, enabled=False):
            self._combine(ctx, jacobian, unshared_grads, loss_vector, scale, shared, unshared, splits > 1)
        return self._weights_by_task(names)

    # -- helpers --------------------------------------------------------------------------------
    def _weights_by_task(self, names: list[str]) -> dict[str, Tensor]:
        last = self._last_weights
        if last is None:
            return {}
        return dict(zip(names, last.detach().float().unbind()))

    def _check_engine(self, architecture: Any) -> None:
        """A clear error where ``engine="gramian"`` cannot run: a method that reads J itself, or an
        architecture whose per-task passes must not be vmapped."""
        if self.engine != "gramian":
            return
        if not self.weights_from_gramian:
            raise ValueError(
                f"{self.name} computes its update from the Jacobian itself (or from two sample halves), not from "
                "the Gramian alone, so it cannot run with engine='gramian'; use engine='jacobian'."
            )
        if getattr(architecture, "separate_task_passes", False):
            raise ValueError(
                f"{self.name}: engine='gramian' runs one vmapped backward, and {type(architecture).__name__} makes a "
                "forward pass per task (a vmapped backward would traverse all of them for every task). Its "
                "shared parameters are few (adapters): use engine='jacobian'."
            )

    def _gramian_engine_step(self, ctx: BalancingContext, scaled: list[Tensor], loss_vector: Tensor,
                             scale: Optional[Tensor], shared: list[nn.Parameter], unshared: list[nn.Parameter]) -> None:
        """Param mode without the Jacobian (``engine="gramian"``): the streamed Gramian, the weights, one
        backward of Σ_t w_t L_t into the shared parameters; aggregated per micro-batch like rep mode."""
        self._check_engine(ctx.architecture)
        names = list(ctx.task_names)
        # The Gramian's products run inside the backward, where autocast still applies (fp16 overflows).
        with ctx.no_sync(), torch.autocast(loss_vector.device.type, enabled=False):
            head_inputs = None if ctx.head_inputs is None else [ctx.head_inputs.get(n) for n in names]
            lookups = self._lookups.take() if self._lookups is not None else []
            streamed, unshared_grads, weighted_gradient = per_task_gramian(scaled, ctx.features, shared, unshared,
                                                                           head_inputs, lookups)
            matrix = streamed.double()
            if scale is not None:
                matrix = matrix / scale.double() ** 2
            matrix, loss_vector = self._global_gramian(ctx, matrix, loss_vector, side_by_side=False)
            self._last_weights = self.step_weights(matrix, loss_vector, ctx)
            shared_grads = weighted_gradient(self._last_weights)
        self._apply_per_microbatch(ctx, shared, unshared, shared_grads, unshared_grads)

    @staticmethod
    def _global_gramian(ctx: BalancingContext, matrix: Tensor, loss_vector: Tensor,
                        side_by_side: bool = True) -> tuple[Tensor, Tensor]:
        """The global Gramian (one all-reduce, with the losses) and the rank-averaged losses; unchanged on
        one process. ``side_by_side`` (rep mode): the Gramian of the ranks' representation Jacobians side by
        side, each 1/W of the whole batch's (the mean of their Gramians / W: what one process gets on the
        whole batch); else (the Gramian engine's parameter Jacobians) the mean of their Gramians."""
        if ctx.world_size <= 1:
            return matrix, loss_vector
        t = matrix.shape[0]
        summary = ctx.reduce_mean(torch.cat([matrix.reshape(-1), loss_vector.double()]))
        mean = summary[: t * t].view(t, t)
        return mean / ctx.world_size if side_by_side else mean, summary[t * t:].float()

    def _apply_per_microbatch(self, ctx: BalancingContext, shared: list[nn.Parameter], unshared: list[nn.Parameter],
                              shared_grads: list[Tensor], unshared_grads: list[Tensor]) -> None:
        """Accumulate this micro-batch's gradients (rep mode, Gramian engine) and write their mean over
        micro-batches and ranks at the step's last one."""
        total = self._accumulate(ctx, [*shared_grads, *unshared_grads])
        if total is not None:
            self._write(shared, total[: len(shared)])
            self._write(unshared, total[len(shared):])
    def batched_for(self, ctx: BalancingContext) -> bool:
        """Whether this step's per-task backward passes run as one vmapped backward: ``batched``, unless
        the architecture runs a separate forward pass per task (``separate_task_passes``), where a
        vmapped backward would traverse every task's pass for every row."""
        return self.batched and not getattr(ctx.architecture, "separate_task_passes", False)

    def _splits_samples(self, ctx: BalancingContext) -> bool:
        """Whether this step's Jacobian comes as two sample halves (see :attr:`double_sampling`)."""
        if not self.double_sampling or self.mode != "param":
            return False
        if isinstance(ctx.features, Tensor) and ctx.features.dim() > 0:
            return True
        if not self._warned_no_split:
            self._warned_no_split = True
            warnings.warn(f"{self.name}: the architecture has no shared representation, so the batch cannot be "
                          "split into two halves after the forward pass; both samples of the double sampling are "
                          "the whole batch (A = JJᵀ).", stacklevel=2)
        return False

    def _split_jacobian(self, blocks: list[Tensor], scale: Optional[Tensor]) -> tuple[list[Tensor], Tensor]:
        """J = J₀ + J₁ and A = (2J₀)(2J₁)ᵀ of the unscaled gradients (float64) from the engine's
        split-major ``(2T, *shape)`` blocks."""
        t = blocks[0].shape[0] // 2
        halves = [b.unflatten(0, (2, t)) for b in blocks]
        cross = 4.0 * cross_gramian([h[0] for h in halves], [h[1] for h in halves]).double()
        if scale is not None:
            cross = cross / scale.double() ** 2
        return [h.sum(0) for h in halves], cross

    def _combine(self, ctx: BalancingContext, jacobian: list[Tensor], unshared_grads: list[Tensor], loss_vector: Tensor,
                 scale: Optional[Tensor], shared: list[nn.Parameter], unshared: list[nn.Parameter],
                 halves: bool = False) -> None:
        """Accumulate, all-reduce, aggregate and write ``.grad`` (see the module docstring);
        ``unshared_grads`` are Σ_t ∂L_t/∂θ of the ``unshared`` parameters; ``halves``: the Jacobian comes
        as two sample halves (:attr:`double_sampling`)."""
        if self.mode == "param":
            # J, head gradients and losses are averaged over micro-batches and ranks, then aggregated once.
            total = self._accumulate(ctx, [*jacobian, *unshared_grads, loss_vector.to(jacobian[0].dtype)])
            if total is None:
                return
            n = len(jacobian)
            jacobian, unshared_grads, loss_vector = total[:n], total[n:-1], total[-1].float()
            gramian: Optional[Tensor] = None
            if halves:
                jacobian, gramian = self._split_jacobian(jacobian, scale)
            elif self.uses_gramian:
                gramian = self._gramian(jacobian, scale)
            direction, self._last_weights = self.aggregate(jacobian, gramian, loss_vector, scale, ctx)
            self._write(shared, direction)
            self._write(unshared, unshared_grads)
            return
        gramian = self._gramian(jacobian, scale) if self.uses_gramian else None
        if gramian is None:
            if ctx.world_size > 1:
                loss_vector = ctx.reduce_mean(loss_vector)
        else:
            gramian, loss_vector = self._global_gramian(ctx, gramian, loss_vector)
        direction, self._last_weights = self.aggregate(jacobian, gramian, loss_vector, scale, ctx)
        shared_grads = representation_backward(ctx.features, shared, direction[0])
        self._apply_per_microbatch(ctx, shared, unshared, shared_grads, unshared_grads)

    def _accumulate(self, ctx: BalancingContext, tensors: list[Tensor]) -> Optional[list[Tensor]]:
        """Sum ``tensors`` over the micro-batches of a step; at its last one return their mean over
        micro-batches and DDP ranks (one all-reduce), else None. Copies only what accumulation or
        the all-reduce need."""
        if self._buffer is None:
            self._buffer = tensors
        else:
            for acc, new in zip(self._buffer, tensors):
                acc.add_(new)
        if not ctx.is_last_microbatch:
            return None
        total, self._buffer = self._buffer, None
        if ctx.accumulate_grad_batches > 1:
            for tensor in total:
                tensor.div_(ctx.accumulate_grad_batches)
        if ctx.world_size > 1:
            flat = ctx.reduce_mean(torch.cat([x.reshape(-1) for x in total]))
            total = [x.view_as(like) for x, like in zip(flat.split([x.numel() for x in total]), total)]
        return total

    @staticmethod
    def _gramian(jacobian: list[Tensor], scale: Optional[Tensor]) -> Tensor:
        """M = JJᵀ of the unscaled gradients, summed block by block (no T×P concatenation)."""
        m = gramian(jacobian).double()
        return m if scale is None else m / scale.double() ** 2

    @staticmethod
    def _write(params: list[nn.Parameter], grads: list[Tensor]) -> None:
        """Add ``grads`` into the ``.grad`` of ``params`` (other contributions, e.g. R(θ), are kept)."""
        for p, g in zip(params, grads):
            if g.shape != p.shape:
                g = g.view_as(p)
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g if g.is_contiguous() else g.contiguous()
            else:
                p.grad.add_(g)

    def state_dict(self) -> dict[str, Any]:
        """What the next steps depend on. The base class keeps the solver's warm start; methods with more
        state (generators, moving averages) add theirs to it."""
        return {} if self._previous is None else {"warm_start": self._previous}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = state_dict.get("warm_start")


class Generator:
    """A torch random generator on the data's device, created lazily from ``seed``, whose state is
    checkpointed (methods with randomness: PCGrad's order, GradVac's order, GradDrop's U)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator: Optional[torch.Generator] = None
        self._pending_state: Optional[Tensor] = None

    def get(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def state(self) -> Optional[Tensor]:
        return self._generator.get_state() if self._generator is not None else self._pending_state

    def load(self, state: Optional[Tensor]) -> None:
        self._generator = None
        self._pending_state = state
