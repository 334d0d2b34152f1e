"""The per-task gradient engine: the T×P Jacobian of the task losses, computed once, reused by every
gradient balancing method and by negative-transfer monitoring.

``task_jacobian`` computes ∂L_t/∂x for every task t and every input tensor x (shared parameters in
"param mode", the shared representation in "rep mode"). With ``batched=True`` it runs **one**
vmapped backward over all tasks (``is_grads_batched``); where an op has no batching rule it falls
back to a loop of T backward passes. Everything stays on the device: no host round-trip.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Sequence, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

#: Graph signatures whose batched backward failed; the loop is used for them. A batched attempt always
#: keeps the graph: one that fails midway (an op without a batching rule, a dropout recomputed by
#: activation checkpointing) must leave it whole for the loop.
_BATCHING_FAILURES: set[str] = set()


def task_jacobian(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    batched: bool = True,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Per-task gradients of ``losses`` (T scalars) w.r.t. each tensor in ``inputs``.

    Returns one tensor per input, of shape ``(T, *input.shape)``; inputs a loss does not depend on
    get zeros. ``batched`` uses a single vmapped backward and falls back to the loop when autograd
    cannot batch the graph (the fallback is remembered per graph signature and not retried).
    """
    losses = list(losses)
    inputs = list(inputs)
    if not losses:
        raise ValueError("task_jacobian needs at least one loss.")
    if batched and len(losses) > 1:
        key = ",".join(type(l.grad_fn).__name__ for l in losses)
        if key not in _BATCHING_FAILURES:
            stacked = torch.stack(losses)
            eye = torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype)
            try:
                grads = torch.autograd.grad(
                    stacked, inputs, grad_outputs=eye, retain_graph=True,
                    is_grads_batched=True, allow_unused=True,
                )
                return [torch.zeros((len(losses), *x.shape), device=x.device, dtype=x.dtype) if g is None else g
                        for g, x in zip(grads, inputs)]
            except RuntimeError:
                _BATCHING_FAILURES.add(key)
    rows: list[list[Tensor]] = [[] for _ in inputs]
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, inputs, retain_graph=retain_graph or i < len(losses) - 1, allow_unused=True
        )
        for slot, g, x in zip(rows, grads, inputs):
            slot.append(torch.zeros_like(x) if g is None else g)
    return [torch.stack(r) for r in rows]


def flatten_jacobian(per_input: Sequence[Tensor]) -> Tensor:
    """(T, P) matrix from the per-input ``(T, *shape)`` gradients of :func:`task_jacobian`."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in per_input], dim=1)


#: Row length from which a CPU Gramian is computed as a batched product over column chunks; shorter
#: blocks are multiplied in groups of up to this many columns.
_CHUNKED_GRAMIAN_MIN_COLUMNS = 1 << 16
_GRAMIAN_CHUNKS = 16
#: Up to this many tasks the weighted sum of rows is accumulated row by row.
_ROW_BY_ROW_MAX_TASKS = 4


def gramian(blocks: Sequence[Tensor]) -> Tensor:
    """M = JJᵀ (T×T, float32) of the Jacobian given as blocks ``(T, *shape)``, summed block by block
    (no T×P concatenation); bf16 / fp16 blocks are upcast.

    Short blocks (biases, norms, small kernels; wherever they sit among the long ones) are concatenated
    into groups of up to 65,536 columns and multiplied once per group: per-block products cost a call each, which for
    models with hundreds of parameter tensors outweighs the small copy. On CPU a long block is
    multiplied as a batched product over column chunks (:class:`_GramianAccumulator`).
    """
    accumulator = _GramianAccumulator()
    for block in blocks:
        accumulator.add(block)
    total = accumulator.result()
    if total is None:
        raise ValueError("gramian needs at least one Jacobian block.")
    return total


class _GramianAccumulator:
    """Σ over blocks of the T×T Gramian (float32) of ``(T, *shape)`` blocks, fed one block at a time (what
    :func:`gramian` sums, and :func:`streamed_gramian` as autograd hands it the blocks): a long block is
    multiplied at once, the short ones (wherever they sit among the long ones) are buffered into
    concatenated groups of up to ``_CHUNKED_GRAMIAN_MIN_COLUMNS`` columns."""

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None
        self._short: list[Tensor] = []
        self._width = 0

    def add(self, block: Tensor) -> None:
        flat = block.reshape(block.shape[0], -1).float()
        if flat.shape[1] >= _CHUNKED_GRAMIAN_MIN_COLUMNS:
            self._add_matrix(flat)
            return
        if self._width + flat.shape[1] > _CHUNKED_GRAMIAN_MIN_COLUMNS:
            self._flush()
        self._short.append(flat)
        self._width += flat.shape[1]

    def add_batched(self, tensor: Tensor, dim: int) -> None:
        """Add the rows of ``tensor`` whose task dimension is ``dim``. Where it is not the first and the
        rows are long, the Gramian is a sum of small products over the leading dimensions (no copy of
        the block into task-major order)."""
        if dim == 0:
            self.add(tensor)
            return
        lead = math.prod(tensor.shape[:dim])
        trail = math.prod(tensor.shape[dim + 1:])
        if trail < 16 or lead * trail < _CHUNKED_GRAMIAN_MIN_COLUMNS:
            self.add(tensor.movedim(dim, 0))
            return
        blocks = tensor.reshape(lead, tensor.shape[dim], trail).float()
        self._add_part(torch.bmm(blocks, blocks.transpose(1, 2)).sum(0))

    def result(self) -> Optional[Tensor]:
        """The sum so far (None before any block)."""
        self._flush()
        return self.total

    def _flush(self) -> None:
        if self._short:
            self._add_matrix(self._short[0] if len(self._short) == 1 else torch.cat(self._short, 1))
            self._short, self._width = [], 0

    def _add_matrix(self, matrix: Tensor) -> None:
        """Add the Gramian of a float32 (T, n) matrix. On CPU a long one is split into column chunks and
        multiplied as one batched product: MKL runs the skinny (T × n)·(n × T) product of a long row on a
        single thread, the batched one on all of them (the Gramian of the reference benchmark's param
        mode: 1.3–1.6× faster at T = 2 to 16)."""
        columns = matrix.shape[1]
        if matrix.device.type == "cpu" and columns >= _CHUNKED_GRAMIAN_MIN_COLUMNS:
            width = columns // _GRAMIAN_CHUNKS
            covered = width * _GRAMIAN_CHUNKS
            chunks = matrix[:, :covered].unflatten(1, (_GRAMIAN_CHUNKS, width)).transpose(0, 1)
            part = torch.bmm(chunks, chunks.transpose(1, 2)).sum(0)
            if covered < columns:
                rest = matrix[:, covered:]
                part.addmm_(rest, rest.T)
            self._add_part(part)
        elif self.total is None:
            self.total = matrix @ matrix.T
        else:
            self.total.addmm_(matrix, matrix.T)

    def _add_part(self, part: Tensor) -> None:
        self.total = part if self.total is None else self.total.add_(part)


def combine(weights: Tensor, blocks: Sequence[Tensor]) -> list[Tensor]:
    """Σ_t weights[t]·J_t, one tensor of ``shape`` per block ``(T, *shape)``, in the blocks' dtype.

    Up to a few tasks the rows are accumulated one by one (two streaming passes at T = 2), which is
    faster than the (1 × T)·(T × n) product that MKL runs on a single thread; beyond, that product.
    """
    out = []
    cast: dict[torch.dtype, tuple[Tensor, tuple[Tensor, ...]]] = {}  # weights (and their entries) per dtype
    for block in blocks:
        if block.dtype not in cast:
            w = weights.to(block.dtype)
            cast[block.dtype] = w, w.unbind()
        w, entries = cast[block.dtype]
        if block.shape[0] <= _ROW_BY_ROW_MAX_TASKS:
            rows = block.unbind()
            total = torch.mul(rows[0], entries[0])
            for row, entry in zip(rows[1:], entries[1:]):
                total.addcmul_(row, entry)
            out.append(total)
        else:
            out.append(torch.tensordot(w, block, dims=1))
    return out


def unflatten_into(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat (P,) vector into tensors shaped like ``like``."""
    out, start = [], 0
    for x in like:
        n = x.numel()
        out.append(vector[start : start + n].view_as(x))
        start += n
    if start != vector.numel():
        raise ValueError(f"Vector of {vector.numel()} values does not match tensors holding {start}.")
    return out


def _batched_or_looped_vjp(output: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, batched: bool) -> list[Tensor]:
    """(T, *x.shape) gradients of ⟨cotangents[t], output⟩ w.r.t. each ``x`` in ``inputs``: one vmapped
    backward when ``batched`` (falling back to a loop where autograd cannot batch), else T backwards."""
    count = cotangents.shape[0]
    if batched and count > 1:
        key = f"vjp:{type(output.grad_fn).__name__}"
        if key not in _BATCHING_FAILURES:
            try:
                grads = torch.autograd.grad(
                    output, inputs, grad_outputs=cotangents, retain_graph=True,
                    is_grads_batched=True, allow_unused=True,
                )
                return [torch.zeros((count, *x.shape), device=x.device, dtype=x.dtype) if g is None else g
                        for g, x in zip(grads, inputs)]
            except RuntimeError:
                _BATCHING_FAILURES.add(key)
    rows: list[list[Tensor]] = [[] for _ in inputs]
    for t in range(count):
        grads = torch.autograd.grad(output, inputs, grad_outputs=cotangents[t], retain_graph=t < count - 1, allow_unused=True)
        for slot, g, x in zip(rows, grads, inputs):
            slot.append(torch.zeros_like(x) if g is None else g)
    return [torch.stack(r) for r in rows]


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def per_task_gradients(
    losses: Sequence[Tensor],
    features: Any,
    shared: Sequence[Tensor],
    unshared: Sequence[Tensor],
    mode: str = "param",
    batched: bool = True,
    head_inputs: Optional[Sequence[Optional[Tensor]]] = None,
    sample_splits: int = 1,
) -> tuple[list[Tensor], list[Tensor]]:
    """The per-task Jacobian w.r.t. the shared parameters and Σ_t ∂L_t/∂θ for every other parameter.

    ``shared`` are the parameters every task reaches (the architecture's shared role), ``unshared``
    the rest: heads, task-own and mixing parameters, which get the unweighted sum of the task
    gradients (for a head or a task-own part: its own task's gradient). ``features`` is the shared
    representation z when the architecture has one, else features by task.

    With z and ``head_inputs`` (per task, the alias of z its path read, see
    ``MultiTaskModule.encode``) this is **one** backward of Σ_t L_t down to the aliases (and every
    unshared parameter); without aliases, one small backward per task. Then

    * ``mode="param"``: the T rows ∂L_t/∂z go through the shared parameters in one batched backward
      (or a loop of T): one ``(T, *p.shape)`` block per shared parameter;
    * ``mode="rep"``: the Jacobian is ∂L_t/∂z itself, one ``(T, *z.shape)`` block; the shared
      parameters are not touched (the caller backpropagates the aggregated direction once, see
      :func:`representation_backward`).

    Without a shared representation (features by task) param mode differentiates the stacked losses
    w.r.t. shared and unshared parameters in one batched backward. The blocks are not concatenated
    (no T×P copy): :func:`flatten_jacobian` gives the T×P matrix.

    ``sample_splits = S > 1`` (param mode with a shared representation; for stochastic methods that
    need task Jacobians of independent sample sets, e.g. MoDo's double sampling) splits the micro-batch
    by sample index modulo S and returns blocks ``(S·T, *shape)``, split-major: rows s·T + t are the
    contributions of the samples i ≡ s (mod S) to ∂L_t/∂θ, from the rows ∂L_t/∂z masked to those
    samples (one batched backward of S·T rows instead of T; no extra forward). They sum to the Jacobian
    exactly; each is the gradient of the split's share of the mean loss, so S × split s estimates J
    (exactly the split's mean-loss gradient when every sample is labelled and B is a multiple of S). The
    index-modulo split keeps the same sample sets under accumulation and DDP (contiguous micro-batches
    and rank shards of a size divisible by S). An encoder that mixes samples (BatchNorm in training
    mode) couples the splits through its statistics.

    Returns ``(jacobian_blocks, unshared_gradients)``.
    """
    if mode not in ("param", "rep"):
        raise ValueError(f"mode must be 'param' or 'rep', got {mode!r}.")
    if sample_splits != 1 and (sample_splits < 1 or mode != "param" or not isinstance(features, Tensor)
                               or features.dim() == 0):
        raise ValueError(
            f"sample_splits={sample_splits} needs param mode and a shared, batch-first representation; got "
            f"mode={mode!r} and {tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}."
        )
    losses, shared, unshared = list(losses), list(shared), list(unshared)
    if not isinstance(features, Tensor):
        if mode == "rep":
            raise ValueError(
                "Representation mode needs one shared representation that every task reads; the model "
                f"gave {type(features).__name__} (features by task). Use mode='param'."
            )
        blocks = task_jacobian(losses, [*shared, *unshared], batched=batched, retain_graph=False)
        return blocks[: len(shared)], [b.sum(0) for b in blocks[len(shared):]]
    cotangents, unshared_grads = _representation_rows(losses, features, unshared, head_inputs)
    if mode == "rep":
        return [cotangents], unshared_grads
    if sample_splits > 1:
        cotangents = split_by_sample(cotangents, sample_splits)
    return _batched_or_looped_vjp(features, shared, cotangents, batched), unshared_grads


def _representation_rows(losses: list[Tensor], features: Tensor, unshared: list[Tensor],
                         head_inputs: Optional[Sequence[Optional[Tensor]]]) -> tuple[Tensor, list[Tensor]]:
    """The rows ∂L_t/∂z (T, *z.shape) and Σ_t ∂L_t/∂θ of the ``unshared`` parameters: one backward through
    the tasks' aliases of z where the model gave them, else one small backward per task."""
    if head_inputs is not None and len(head_inputs) == len(losses):
        rows, unshared_grads = _aliased_backward(losses, features, head_inputs, unshared)
        return torch.stack(rows), unshared_grads
    rows = []
    summed: Optional[list[Optional[Tensor]]] = None
    for loss in losses:
        grads = torch.autograd.grad(loss, [features, *unshared], retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(features) if grads[0] is None else grads[0])
        summed = _add(summed, grads[1:])
    return torch.stack(rows), _zeros_for_none(summed if summed is not None else [None] * len(unshared), unshared)


def per_task_gramian(
    losses: Sequence[Tensor],
    features: Any,
    shared: Sequence[Tensor],
    unshared: Sequence[Tensor],
    head_inputs: Optional[Sequence[Optional[Tensor]]] = None,
    lookups: Sequence[_Lookup] = (),
) -> tuple[Tensor, list[Tensor], Callable[[Tensor], list[Tensor]]]:
    """Param mode without the T×P Jacobian: its Gramian M = JJᵀ w.r.t. the ``shared`` parameters
    (:func:`streamed_gramian`, float32), Σ_t ∂L_t/∂θ for the ``unshared`` ones (as
    :func:`per_task_gradients`), and a function of weights w (T,) that returns Σ_t w_t ∂L_t/∂θ for each
    shared parameter (one more backward, which frees the graph; call it once).

    With a shared representation z the T rows ∂L_t/∂z are streamed through the encoder and the weighted
    gradient is one backward of Σ_t w_t ∂L_t/∂z; with features by task, the stacked losses are.
    ``lookups``: the embedding lookups of this forward pass (:class:`EmbeddingLookups`). Where the
    vmapped backward fails on the graph (an op functorch cannot batch), the step falls back to a loop
    of T backward passes that holds J (the same update; a warning says so once).
    """
    losses, shared, unshared = list(losses), list(shared), list(unshared)
    if isinstance(features, Tensor):
        cotangents, unshared_grads = _representation_rows(losses, features, unshared, head_inputs)
        try:
            matrix, _ = streamed_gramian(features, cotangents, shared, lookups=lookups)
        except RuntimeError as error:
            _warn_unstreamable(error)
            held, weighted = _held_jacobian(_batched_or_looped_vjp(features, shared, cotangents, batched=False))
            return held, unshared_grads, weighted

        def weighted_gradient(weights: Tensor) -> list[Tensor]:
            return representation_backward(features, shared, combine(weights, [cotangents])[0])

        return matrix, unshared_grads, weighted_gradient
    stacked = torch.stack(losses)
    try:
        matrix, rows = streamed_gramian(stacked, torch.eye(len(losses), device=stacked.device, dtype=stacked.dtype),
                                        shared, unshared, lookups=lookups)
    except RuntimeError as error:
        _warn_unstreamable(error)
        blocks = task_jacobian(losses, [*shared, *unshared], batched=False, retain_graph=False)
        matrix, weighted = _held_jacobian(blocks[: len(shared)])
        return matrix, [b.sum(0) for b in blocks[len(shared):]], weighted

    def weighted_losses_gradient(weights: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(stacked, shared, grad_outputs=weights.to(stacked.dtype), allow_unused=True)
        return _zeros_for_none(grads, shared)

    return matrix, [r.sum(0) for r in rows], weighted_losses_gradient


_UNSTREAMABLE_WARNED: set[str] = set()


def _warn_unstreamable(error: RuntimeError) -> None:
    """Say once per kind of failure that this graph could not be streamed and the step holds J instead."""
    message = str(error).split("\n")[0][:200]
    if message not in _UNSTREAMABLE_WARNED:
        _UNSTREAMABLE_WARNED.add(message)
        warnings.warn(f"engine='gramian': the vmapped backward failed on this graph ({message}); the step holds the "
                      "Jacobian instead (a loop of T backward passes: the same update, the memory of "
                      "engine='jacobian').", stacklevel=3)


def _held_jacobian(blocks: list[Tensor]) -> tuple[Tensor, Callable[[Tensor], list[Tensor]]]:
    """The Gramian of Jacobian blocks held in memory, and the weighted sum of their rows (the fallback of
    :func:`per_task_gramian`)."""
    return gramian(blocks), lambda weights: combine(weights, blocks)


def split_by_sample(rows: Tensor, splits: int) -> Tensor:
    """``rows`` (T, B, …) as (S·T, B, …), split-major: copy s keeps the samples i ≡ s (mod S), zeros elsewhere."""
    batch = rows.shape[1]
    owner = torch.arange(batch, device=rows.device) % splits
    masks = (owner == torch.arange(splits, device=rows.device).unsqueeze(1)).to(rows.dtype)  # (S, B)
    masks = masks.view(splits, 1, batch, *([1] * (rows.dim() - 2)))
    return (rows.unsqueeze(0) * masks).flatten(0, 1)


def cross_gramian(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """A = J_a J_bᵀ (T×T, not symmetric in general) of two Jacobians given as matching blocks
    ``(T, *shape)``: exact float64 products for float64 blocks, else float32 ones (as :func:`gramian`)."""
    total: Optional[Tensor] = None
    for a, b in zip(left, right):
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        part = a.reshape(a.shape[0], -1).to(dtype) @ b.reshape(b.shape[0], -1).to(dtype).T
        total = part if total is None else total.add_(part)
    if total is None:
        raise ValueError("cross_gramian needs at least one pair of Jacobian blocks.")
    return total


def _add(total: Optional[list[Optional[Tensor]]], grads: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    if total is None:
        return list(grads)
    return [a if b is None else b if a is None else a + b for a, b in zip(total, grads)]


def _aliased_backward(losses: list[Tensor], features: Tensor, head_inputs: Sequence[Optional[Tensor]],
                      unshared: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Every task's ∂L_t/∂z (through its own alias of z) and Σ_t ∂L_t/∂θ for the unshared
    parameters, from one backward of Σ_t L_t; a task that read detached features gets zeros for z."""
    aliases = [x for x in head_inputs if x is not None and x.requires_grad]
    grads = torch.autograd.grad(losses, [*aliases, *unshared], retain_graph=True, allow_unused=True)
    by_alias = iter(grads[: len(aliases)])
    found = [next(by_alias) if x is not None and x.requires_grad else None for x in head_inputs]
    rows = [torch.zeros_like(features) if g is None else g for g in found]
    return rows, _zeros_for_none(grads[len(aliases):], unshared)


def representation_backward(features: Tensor, shared: Sequence[Tensor], direction: Tensor) -> list[Tensor]:
    """Gradient of ⟨direction, features⟩ w.r.t. each of ``shared``: the single encoder backward of rep mode."""
    grads = torch.autograd.grad(features, list(shared), grad_outputs=direction.view_as(features).to(features.dtype),
                                allow_unused=True)
    return _zeros_for_none(grads, shared)


# -- the Gramian without the Jacobian -------------------------------------------------------------------
class _GramianSink(torch.autograd.Function):
    """The identity on a parameter's gradient, except inside the vmapped backward of
    :func:`streamed_gramian`: there its vmap rule sees the T rows at once, adds their Gramian to the
    accumulator and hands autograd back zeros that take no memory (a 0-d tensor expanded)."""

    @staticmethod
    def forward(grad: Tensor, accumulator: _GramianAccumulator) -> Tensor:
        return grad

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Optional[int], None], grad: Tensor,
             accumulator: _GramianAccumulator) -> tuple[Tensor, Optional[int]]:
        dim = in_dims[0]
        if dim is None:  # the same row for every task
            accumulator.add(grad.unsqueeze(0).expand(info.batch_size, *grad.shape))
        else:
            accumulator.add_batched(grad, dim)
        return grad.new_zeros(()).expand(grad.shape), dim


@dataclass
class _Lookup:
    """One call of an embedding table: the gradient edge of its output, its indices, its padding index."""

    weight: Tensor
    edge: GradientEdge
    indices: Tensor
    padding_idx: Optional[int]


class EmbeddingLookups:
    """Records the lookups of the embedding tables among ``parameters`` during the forward pass, so that
    :func:`streamed_gramian` takes a table's part of the Gramian from the lookups' output gradients
    (T × tokens × width, coalesced by index) instead of the T dense V × width gradients of the table
    (of a 30k-token vocabulary: 47 MB per task and 384 columns).

    A table qualifies when it is an ``nn.Embedding`` (forward not overridden, no ``scale_grad_by_freq``)
    whose weight belongs to no other module; at each use :func:`streamed_gramian` also checks on the
    autograd graph that the loss reads the weight through the recorded lookups only (else the table
    takes the general path). Call :meth:`remove` to drop the hooks.
    """

    def __init__(self, root: nn.Module, parameters: Sequence[Tensor]) -> None:
        wanted = {id(p) for p in parameters}
        owners = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
        self.tables = [m for m in root.modules()
                       if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward
                       and not m.scale_grad_by_freq and id(m.weight) in wanted and owners[id(m.weight)] == 1]
        self._records: list[_Lookup] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.tables]

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor) and output.grad_fn is not None:
            embedding = cast(nn.Embedding, module)
            self._records.append(_Lookup(embedding.weight, get_gradient_edge(output), args[0].detach(),
                                         embedding.padding_idx))

    def take(self) -> list[_Lookup]:
        """The lookups recorded since the last call (stale ones, of a graph already used, are ignored)."""
        records, self._records = self._records, []
        return records

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []


def _lookups_read_alone(output: Tensor, lookups: Sequence[_Lookup]) -> list[_Lookup]:
    """The lookups of ``output``'s graph whose table the graph reads through its recorded lookups only."""
    if output.grad_fn is None or not lookups:
        return []
    tables = {id(get_gradient_edge(l.weight).node): l.weight for l in lookups}
    lookup_nodes = {id(l.edge.node) for l in lookups}
    reached: set[int] = set()
    read_elsewhere: set[int] = set()
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in lookup_nodes:
            reached.add(id(node))
            continue
        for child, _ in node.next_functions:
            if child is None:
                continue
            if id(child) in tables:
                read_elsewhere.add(id(tables[id(child)]))
            else:
                stack.append(child)
    return [l for l in lookups if id(l.edge.node) in reached and id(l.weight) not in read_elsewhere]


def _add_lookup_gramian(accumulator: _GramianAccumulator, lookups: list[_Lookup], rows: list[Tensor]) -> None:
    """Each table's part of the Gramian from its lookups' output rows (T, *indices.shape, width): the
    rows of a task's table gradient are the output rows summed by index (padding rows get none)."""
    for weight_id in dict.fromkeys(id(l.weight) for l in lookups):
        mine = [(l, r) for l, r in zip(lookups, rows) if id(l.weight) == weight_id]
        count, width = mine[0][1].shape[0], mine[0][1].shape[-1]
        indices = torch.cat([l.indices.reshape(-1) for l, _ in mine])
        values = torch.cat([r.reshape(count, -1, width) for _, r in mine], dim=1)
        padding = mine[0][0].padding_idx
        if padding is not None:
            keep = indices != padding
            indices, values = indices[keep], values[:, keep]
        unique, inverse = torch.unique(indices, return_inverse=True)
        table = values.new_zeros(count, unique.numel(), width).index_add_(1, inverse, values)
        accumulator.add(table)


def streamed_gramian(output: Tensor, cotangents: Tensor, inputs: Sequence[Tensor],
                     materialize: Sequence[Tensor] = (), retain_graph: bool = True,
                     lookups: Sequence[_Lookup] = ()) -> tuple[Tensor, list[Tensor]]:
    """M = JJᵀ (T×T, float32) of the rows J_t = ∂⟨cotangents[t], output⟩/∂θ over the tensors θ of ``inputs``,
    without ever holding J: one backward vmapped over the T rows (``torch.func.vmap``), in which a hook on
    each input adds the Gramian of its T rows as soon as autograd has computed them and drops them. At
    most one input's ``(T, *shape)`` rows are alive at a time (TorchJD's autogram engine, Algorithm 3 of
    Quinton & Rey, 2024, holds one module's; this needs no forward hooks and reuses the backward's own
    parameter gradients). An embedding table with recorded ``lookups`` (:class:`EmbeddingLookups`) is
    not differentiated at all: its part comes from its lookups' output rows. The rows w.r.t.
    ``materialize`` (e.g. heads) are returned as ``(T, *shape)``.
    """
    inputs, materialize = list(inputs), list(materialize)
    differentiated = {id(x) for x in inputs}
    read = _lookups_read_alone(output, [l for l in lookups if id(l.weight) in differentiated])
    by_lookup = {id(l.weight) for l in read}
    streamed = [x for x in inputs if id(x) not in by_lookup]
    accumulator = _GramianAccumulator()
    handles = [x.register_hook(partial(_GramianSink.apply, accumulator=accumulator)) for x in streamed]
    targets: list[Any] = [*streamed, *materialize, *(l.edge for l in read)]
    unused: list[bool] = []

    def rows_of(cotangent: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(output, targets, grad_outputs=cotangent, retain_graph=retain_graph,
                                    allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(cotangent.new_zeros(()) if g is None else g for g in grads)  # vmap returns tensors only

    try:
        # randomness="same": a recomputed forward (activation checkpointing) redraws the forward's one
        # dropout mask (the checkpoint restores the random state), not one per task.
        grads = torch.func.vmap(rows_of, randomness="same")(cotangents)
    finally:
        for handle in handles:
            handle.remove()
    count = cotangents.shape[0]
    start = len(streamed)
    kept = [torch.zeros((count, *x.shape), device=x.device, dtype=x.dtype) if missing else g
            for g, missing, x in zip(grads[start:start + len(materialize)], unused[start:], materialize)]
    # the lookups read are in the graph (_lookups_read_alone reached them): autograd gives each its rows
    _add_lookup_gramian(accumulator, read, list(grads[start + len(materialize):]))
    total = accumulator.result()
    return torch.zeros(count, count, device=cotangents.device) if total is None else total, kept
