"""The per-task gradient engine: the T×P Jacobian of the task losses, computed once, reused by every
gradient balancing method and by negative-transfer monitoring.

``task_jacobian`` computes ∂L_t/∂x for every task t and every input tensor x (shared parameters in
"param mode", the shared representation in "rep mode"). With ``batched=True`` it runs **one**
vmapped backward over all tasks (``is_grads_batched``); where an op has no batching rule it falls
back to a loop of T backward passes. Everything stays on the device: no host round-trip.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

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
                    stacked, inputs, grad_outputs=eye, retain_graph=retain_graph,
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
