"""M-ConFIG: ConFIG on per-task momenta, one task's gradient per step (Liu et al., ICLR 2025, arXiv 2408.11104)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.core.engine import combine, gramian, task_jacobian
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.config import ConFIG
from mtl_lightning.gradients.solvers import all_finite

#: What the heads (and every other parameter not shared by all tasks) receive on a step.
HEADS = ("all", "chosen")


class MConFIG(GradientBalancer):
    """The momentum variant of ConFIG: each step computes the gradient of ONE task through the shared
    parameters (the tasks in turn), updates that task's momentum, and steps along the ConFIG direction
    of all the tasks' momenta, normalised as Adam normalises its step.

    Per step, as the official ``PseudoMomentumOperator`` (``conflictfree/momentum_operator.py`` of
    tum-pbs/ConFIG) with its default ``ConFIGOperator``, for the chosen task i with gradient g_i:

    * m_i ← β₁m_i + (1−β₁)g_i and k_i ← k_i + 1 (the other momenta are carried over);
    * until every task has a momentum (the first ⌈T/k⌉ − 1 steps, k = ``tasks_per_step``) the shared
      update is 0;
    * then t ← t + 1, m̂_j = m_j/(1−β₁^k_j) for every task j, and d = ConFIG(m̂_1, …, m̂_T) — the
      direction of equal cosines to the momenta, as long as their projections on it (:class:`ConFIG`'s
      own computation, reused, on the Gramian of the m̂_j);
    * the second moment is that of a pseudo-gradient recovered from d as if d were Adam's bias-corrected
      first moment: f = (1−β₁^t)d, ĝ = (f − β₁f_prev)/(1−β₁), s ← β₂s + (1−β₂)ĝ², ŝ = s/(1−β₂^t);
    * the shared parameters get d/(√ŝ + ε), elementwise.

    The output is already an Adam-like step: the official documentation recommends plain SGD as the
    optimizer (with Adam on top, Adam normalises the normalised step once more), and its MTL trainer
    uses SGD for the whole model, so the heads take plain SGD steps on their gradients at the same
    learning rate (``MultiTaskModule(parameter_groups=...)`` can give them their own).

    **Cost.** One backward of one task's loss through the shared parameters per step, instead of T
    (``tasks_per_step`` > 1: that many, the official MTL trainer's ``--num_updates``); no Jacobian, no
    T×P Gramian of gradients. The forward pass still computes every task's loss (as the official
    trainer does): the heads learn from them, and every task must be labelled in every batch. Memory: the T momenta plus two vectors, each the size of the shared
    parameters (float32 at least), all checkpointed with the counters k_j, t and the next task.

    **Heads.** ``heads="all"`` (default): every head and task-own part gets its own task's gradient
    ∂L_t/∂θ_t every step, mixing parameters Σ_t ∂L_t/∂θ, as in the official MTL trainer (``MConFIG``
    of ``experiments/MTL/methods/weight_methods.py``: the task-specific parameters get ∂(Σ_t L_t)/∂θ).
    The paper's point is to avoid T backward passes through the *shared* parameters; each head's
    gradient is a backward through that head alone (autograd runs only the part of the graph that leads
    to the parameters asked for), and a head that learned only every T-th step would lag behind.
    Where task-own parameters sit *below* shared layers (per-task adapters inside a shared backbone,
    e.g. :class:`~mtl_lightning.architectures.PerTaskLoRA` with a shared adapter), reaching them is a
    backward through the backbone per task: there ``heads="chosen"`` gives only the chosen task(s)'
    own parameters a gradient (the others get none that step), so a step is one backward in all.

    **Modes.** Param mode only: a momentum of the representation gradients ∂L_t/∂z would average
    gradients of different samples (z changes with every batch); rep mode's saving (one encoder
    backward) is what M-ConFIG gives in param mode anyway.

    **DDP, accumulation, AMP.** The chosen task's gradient (and the head gradients) are averaged over
    the micro-batches of an optimizer step, which all compute the same task, and over the DDP ranks
    (one all-reduce) before the momentum is updated, so every rank holds the same state and takes the
    update one process would take on the union batch. Under fp16 loss scaling the momenta hold
    unscaled gradients (the scale changes during training); a step whose gradient overflowed leaves
    the state and the task order unchanged and writes the non-finite gradient, so that the optimizer
    step is skipped and the same task is computed again (this reads one flag on the host per step, as
    the scaler's own skip does).

    Differences from the official code: the ConFIG direction of the momenta comes from their Gramian
    (:class:`ConFIG`: pseudo-inverse of the cosine matrix instead of a least-squares solve of the unit
    vectors, also for T = 2 where the official operator uses its closed form; equal in exact
    arithmetic). The state is float32 as the official buffers, float64 for float64 parameters. The
    fp16 overflow handling and ``heads="chosen"`` are additions (the official code has neither).
    :meth:`aggregate`, given every task's gradient (the property suite, direct calls), updates every
    momentum, as the official operator does when given every index.

    The logged weight of task j is the ConFIG weight a_j of its bias-corrected momentum before the
    Adam-like normalisation (d = Σ_j a_j m̂_j); 0 for every task until every task has a momentum.

    Args:
        beta_1: β₁, the momenta's decay (official 0.9).
        beta_2: β₂, the second moment's decay (official 0.999).
        eps: ε of the normalisation d/(√ŝ + ε) (official 1e-8).
        tasks_per_step: tasks whose gradient is computed per step, in turn (official ``num_updates``,
            default 1); at most the number of tasks.
        heads: ``"all"`` or ``"chosen"``: which tasks' heads and task-own parameters get their
            gradient on a step (see above).

    Examples:
        Two tasks computed in turn, one gradient per step (task 0 at steps 0 and 2, task 1 at steps 1
        and 3). Step 0 has task 0's momentum only: no update. Step 1 is Adam's first step, ±1 per
        coordinate; from then on each momentum carries its task over the steps it is not computed.

        >>> import torch
        >>> from mtl_lightning.gradients import MConFIG
        >>> gradients = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [1.0, 0.5], [-1.0, 3.0]], dtype=torch.float64)
        >>> method = MConFIG()
        >>> for g in gradients:
        ...     task = method.next_task
        ...     (step,), a = method.momentum_step([task], [g.unsqueeze(0)], num_tasks=2)
        ...     print(task, [round(v, 4) for v in step.tolist()], [round(v, 4) for v in a.tolist()])
        0 [0.0, 0.0] [0.0, 0.0]
        1 [1.0, 1.0] [1.2071, 0.8536]
        0 [0.9891, 0.98] [1.1838, 0.8656]
        1 [0.804, 0.9207] [1.604, 0.7264]

        Before the normalisation, d = Σ_j a_j m̂_j makes equal angles with the bias-corrected momenta:

        >>> m_hat = torch.stack([m / (1 - 0.9**k) for m, k in zip(method.momenta[0], method.updates)])
        >>> d = a @ m_hat
        >>> [round(v, 4) for v in (m_hat @ d / (m_hat.norm(dim=1) * d.norm())).tolist()]
        [0.6345, 0.6345]
    """

    supported_modes = ("param",)
    uses_gramian = False  # the direction comes from the Gramian of the momenta, not of the gradients
    # Not promised: the update is ConFIG's direction of the momenta rescaled elementwise (Adam's
    # normalisation), so it is neither a positive multiple of a single or common gradient, nor
    # conflict-free or invariant to per-task scales in the Euclidean sense; those hold for d before
    # the normalisation. The aggregation of the momenta is symmetric in the tasks (the turn order
    # follows the task order).
    promises = frozenset({"permutation_equivariant"})

    def __init__(self, beta_1: float = 0.9, beta_2: float = 0.999, eps: float = 1e-8, tasks_per_step: int = 1,
                 heads: str = "all", mode: Optional[str] = None, batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not (0.0 <= beta_1 < 1.0 and 0.0 <= beta_2 < 1.0):
            raise ValueError(f"MConFIG: beta_1 and beta_2 must be in [0, 1), got {beta_1} and {beta_2}.")
        if not eps > 0:
            raise ValueError(f"MConFIG: eps must be > 0, got {eps}.")
        if isinstance(tasks_per_step, bool) or not isinstance(tasks_per_step, int) or tasks_per_step < 1:
            raise ValueError(f"MConFIG: tasks_per_step must be an integer >= 1, got {tasks_per_step!r}.")
        if heads not in HEADS:
            raise ValueError(f"MConFIG: heads={heads!r} is not supported; choose one of {list(HEADS)}.")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.eps = float(eps)
        self.tasks_per_step = tasks_per_step
        self.heads = heads
        self._config = ConFIG()
        #: Per shared parameter, the tasks' first moments m_j, (T, *shape).
        self.momenta: Optional[list[Tensor]] = None
        #: Per shared parameter, s (the second moment of the pseudo-gradient) and f (the last d·(1−β₁^t)).
        self.second_moment: Optional[list[Tensor]] = None
        self.pseudo_momentum: Optional[list[Tensor]] = None
        #: k_j: the updates each task's momentum has had.
        self.updates: list[int] = []
        #: t: the steps taken since every task had a momentum.
        self.steps = 0
        #: The task whose gradient the next step computes.
        self.next_task = 0

    @property
    def scale_exponent(self) -> Optional[float]:
        return 0.0  # g → c·g: m, d and √ŝ all scale by c; the step d/(√ŝ + ε) does not change

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        tasks = len(pl_module.task_names)
        if self.tasks_per_step > tasks:
            raise ValueError(f"MConFIG: tasks_per_step={self.tasks_per_step} is more than the model's {tasks} tasks.")

    # -- the step -------------------------------------------------------------------------------
    def backward(self, ctx: BalancingContext) -> dict[str, Tensor]:
        names = list(ctx.task_names)
        missing = [n for n in names if n not in ctx.losses]
        if missing:
            raise ValueError(
                f"{self.name} needs the loss of every task at every step, but task(s) {missing} have no "
                "labelled sample in this micro-batch. Use batches where every task is labelled, or a "
                "loss-weighting method."
            )
        chosen = self.scheduled_tasks(len(names))
        scale = ctx.loss_scale
        losses = [ctx.losses[n] for n in names]
        if scale is not None:
            losses = [loss * scale for loss in losses]
        shared, unshared = ctx.shared_parameters(), ctx.unshared_parameters()
        with ctx.no_sync():
            rows, head_grads = self._chosen_gradients(losses, chosen, shared, unshared, self.batched_for(ctx))
        # The momentum update is float32/float64 math: keep autocast out of it.
        with torch.autocast(losses[0].device.type, enabled=False):
            # Averaged over the micro-batches (all of the same task) and the ranks, then used once.
            total = self._accumulate(ctx, [*rows, *head_grads])
            if total is not None:
                direction, self._last_weights = self.momentum_step(chosen, total[: len(rows)], len(names), scale)
                self._write(shared, direction)
                self._write(unshared, total[len(rows):])
        last = self._last_weights
        return {} if last is None else dict(zip(names, last.detach().float().unbind()))

    def scheduled_tasks(self, num_tasks: int) -> list[int]:
        """The tasks whose gradient the next step computes: ``tasks_per_step`` of them in turn from
        :attr:`next_task` (the official ``OrderedSliceSelector``)."""
        if self.tasks_per_step > num_tasks:
            raise ValueError(f"MConFIG: tasks_per_step={self.tasks_per_step} is more than the {num_tasks} tasks.")
        return [(self.next_task + j) % num_tasks for j in range(self.tasks_per_step)]

    def _chosen_gradients(self, losses: list[Tensor], chosen: list[int], shared: list[nn.Parameter],
                          unshared: list[nn.Parameter], batched: bool) -> tuple[list[Tensor], list[Tensor]]:
        """The chosen tasks' gradients w.r.t. the shared parameters (blocks ``(k, *shape)``: one
        backward through them per chosen task, batched for k > 1) and the unshared parameters' gradients
        (``heads="all"``: Σ_t ∂L_t/∂θ, from a backward that stops at them)."""
        picked = [losses[i] for i in chosen]
        if self.heads == "chosen":
            blocks = task_jacobian(picked, [*shared, *unshared], batched=batched, retain_graph=False)
            return blocks[: len(shared)], [b.sum(0) for b in blocks[len(shared):]]
        head_grads: list[Tensor] = []
        if unshared:
            # Autograd runs only the nodes that lead to the parameters asked for: the heads, not the encoder.
            grads = torch.autograd.grad(sum(losses[1:], losses[0]), unshared, retain_graph=True, allow_unused=True)
            head_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, unshared)]
        return task_jacobian(picked, shared, batched=batched, retain_graph=False), head_grads

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        """The step from every task's gradient at once: J's T rows update the T momenta (the official
        operator given every index; in training :meth:`backward` computes one task per step and calls
        :meth:`momentum_step` with it). ``gramian`` and ``losses`` are not used."""
        num_tasks = jacobian[0].shape[0]
        return self.momentum_step(list(range(num_tasks)), jacobian, num_tasks, scale)

    def momentum_step(self, tasks: Sequence[int], gradients: list[Tensor], num_tasks: int,
                      scale: Optional[Tensor] = None) -> tuple[list[Tensor], Tensor]:
        """Update the momenta of ``tasks`` with their ``gradients`` (blocks ``(len(tasks), *shape)``, one
        per shared parameter, ×``scale`` under fp16 loss scaling) and return the step for each block
        (in the blocks' dtype, ×``scale``) and the ConFIG weights a (T,) of the bias-corrected momenta.
        The official ``PseudoMomentumOperator.calculate_gradient(tasks, gradients)``."""
        tasks = list(tasks)
        if len(gradients) == 0 or any(g.shape[0] != len(tasks) for g in gradients):
            raise ValueError(f"MConFIG: expected one gradient block with {len(tasks)} rows per shared parameter.")
        if any(not 0 <= i < num_tasks for i in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"MConFIG: tasks {tasks} must be distinct indices below {num_tasks}.")
        dtypes = [g.dtype for g in gradients]
        grads = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in gradients]
        if scale is not None:
            grads = [g / scale.to(g.dtype) for g in grads]
            norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
            if not bool(all_finite(norms)):  # an fp16 overflow: the optimizer skips this step
                return [g.sum(0) for g in gradients], torch.zeros(num_tasks, dtype=torch.float64, device=norms.device)
        momenta, second_moment, pseudo_momentum = self._state(grads, num_tasks)
        with torch.no_grad():
            for j, i in enumerate(tasks):
                self.updates[i] += 1
                for m, g in zip(momenta, grads):
                    m[i].mul_(self.beta_1).add_(g[j], alpha=1 - self.beta_1)
            self.next_task = (self.next_task + len(tasks)) % num_tasks
            device = grads[0].device
            if min(self.updates) == 0:  # not every task has a momentum yet: no update (official)
                zeros = torch.zeros(num_tasks, dtype=torch.float64, device=device)
                return [torch.zeros(g.shape[1:], dtype=dtype, device=device) for g, dtype in zip(grads, dtypes)], zeros
            self.steps += 1
            correction = 1.0 / (1.0 - torch.tensor([self.beta_1**k for k in self.updates], dtype=torch.float64,
                                                   device=device))
            corrected = _momenta_gramian(momenta) * correction * correction.unsqueeze(1)  # Gramian of the m̂_j
            weights = self._config.weights(corrected, torch.ones(num_tasks, dtype=torch.float64, device=device))
            direction = combine(weights * correction, momenta)  # d = Σ_j a_j m̂_j
            keep = 1.0 - self.beta_1**self.steps
            unbias = 1.0 - self.beta_2**self.steps
            out = []
            for d, s, f, dtype in zip(direction, second_moment, pseudo_momentum, dtypes):
                new_f = d * keep
                pseudo_gradient = (new_f - self.beta_1 * f) / (1.0 - self.beta_1)
                f.copy_(new_f)
                s.mul_(self.beta_2).addcmul_(pseudo_gradient, pseudo_gradient, value=1 - self.beta_2)
                step = d / ((s / unbias).sqrt_().add_(self.eps))
                if scale is not None:
                    step = step * scale.to(step.dtype)
                out.append(step.to(dtype))
        return out, weights

    def _state(self, grads: list[Tensor], num_tasks: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The momenta, s and f, created at zero on the first step (in the gradients' dtype, float32 at
        least), checked against the gradients' shapes and moved to their device after a resume."""
        shapes = [tuple(g.shape[1:]) for g in grads]
        if self.momenta is None or self.second_moment is None or self.pseudo_momentum is None:
            self.momenta = [torch.zeros((num_tasks, *g.shape[1:]), dtype=g.dtype, device=g.device) for g in grads]
            self.second_moment = [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
            self.pseudo_momentum = [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
            self.updates = [0] * num_tasks
            self.steps = 0
        held = [tuple(m.shape[1:]) for m in self.momenta]
        if held != shapes or self.momenta[0].shape[0] != num_tasks or len(self.updates) != num_tasks:
            raise ValueError(
                f"MConFIG holds the momenta of {self.momenta[0].shape[0]} tasks for shared parameters of shapes "
                f"{held}, but got the gradients of {num_tasks} tasks for shapes {shapes} (a checkpoint of "
                "another model?)."
            )
        device = grads[0].device
        if self.momenta[0].device != device:
            self.momenta = [m.to(device) for m in self.momenta]
            self.second_moment = [s.to(device) for s in self.second_moment]
            self.pseudo_momentum = [f.to(device) for f in self.pseudo_momentum]
        return self.momenta, self.second_moment, self.pseudo_momentum

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momenta": self.momenta, "second_moment": self.second_moment,
                "pseudo_momentum": self.pseudo_momentum, "updates": list(self.updates), "steps": self.steps,
                "next_task": self.next_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.momenta = state_dict.get("momenta")
        self.second_moment = state_dict.get("second_moment")
        self.pseudo_momentum = state_dict.get("pseudo_momentum")
        self.updates = [int(k) for k in state_dict.get("updates", [])]
        self.steps = int(state_dict.get("steps", 0))
        self.next_task = int(state_dict.get("next_task", 0))


def _momenta_gramian(momenta: list[Tensor]) -> Tensor:
    """M = mmᵀ (T×T, float64) of the momenta: exact float64 products for float64 momenta, else the
    engine's float32 products (as the gradient methods' Gramians)."""
    if momenta[0].dtype == torch.float64:
        flat = [m.reshape(m.shape[0], -1) for m in momenta]
        return sum((f @ f.T for f in flat[1:]), flat[0] @ flat[0].T)
    return gramian(momenta).double()
