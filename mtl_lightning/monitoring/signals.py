"""Negative-transfer signals as pure tensor functions (no Lightning): gradient geometry of the
per-task Jacobian, and the lookahead update of TAG that follows the real optimizer.

Both are used by :class:`~mtl_lightning.monitoring.NegativeTransferMonitor`; keeping them free of
trainer state makes them testable against hand computations and torch's own optimizers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def gradient_geometry(jacobian: Tensor, eps: float = 1e-12) -> dict[str, Tensor]:
    """Pairwise geometry of the task gradients (rows of the ``(T, P)`` Jacobian).

    Returns ``norms`` (T,), ``cosine`` (T, T) and ``gms`` (T, T), the gradient magnitude similarity
    2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) (1: equal norms, → 0: one dominates). Entries that involve a
    zero gradient are NaN (no direction to compare).
    """
    jacobian = jacobian.double()
    norms = jacobian.norm(dim=1)
    gram = jacobian @ jacobian.T
    outer = norms[:, None] * norms[None, :]
    nan = torch.full_like(gram, float("nan"))
    defined = outer > eps
    cosine = torch.where(defined, gram / outer.clamp_min(eps), nan).clamp(-1.0, 1.0)
    squares = norms[:, None] ** 2 + norms[None, :] ** 2
    gms = torch.where(defined, 2.0 * outer / squares.clamp_min(eps), nan)
    return {"norms": norms, "cosine": cosine, "gms": gms}


def _value(x: object) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]


def lookahead_updates(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]
) -> tuple[list[Tensor], Optional[str]]:
    """The update Δθ each task's gradient alone would produce through ``optimizer`` *now*.

    ``grads[k]`` holds the T task gradients of ``params[k]`` stacked, shape ``(T, *param.shape)``.
    SGD (momentum, dampening, Nesterov, weight decay) and Adam / AdamW (bias correction, AMSGrad)
    are followed from their current state, as TAG's official code follows the real optimizer; the
    state is read, never written. Any other optimizer falls back to plain SGD with its group's
    ``lr``, and the returned note says so (None when the optimizer was followed).

    Returns one ``(T, *param.shape)`` tensor per parameter: θ'_t = θ + Δθ_t.
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in groups]
    if missing:
        raise ValueError(
            f"Lookahead: {len(missing)} shared parameter(s) (e.g. index {missing[0]}, shape "
            f"{tuple(params[missing[0]].shape)}) are not in the optimizer; they cannot be stepped."
        )
    note = None
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        kind = "adam"
    else:
        kind = "plain"
        note = (
            f"{type(optimizer).__name__} is not followed by the lookahead; TAG affinities use a plain "
            "SGD step with the optimizer's learning rate."
        )
    updates = []
    for p, g in zip(params, grads):
        group, state = groups[id(p)], optimizer.state.get(p, {})
        p_data = p.detach()[None].to(g.dtype)
        lr = _value(group["lr"])
        if group.get("maximize", False):
            g = -g
        if kind == "plain":
            updates.append(-lr * g)
            continue
        wd = _value(group.get("weight_decay", 0.0))
        if kind == "sgd":
            d = g + wd * p_data if wd else g
            momentum = _value(group.get("momentum", 0.0))
            if momentum:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = d
                else:
                    buf = momentum * buf[None].to(g.dtype) + (1.0 - _value(group.get("dampening", 0.0))) * d
                d = d + momentum * buf if group.get("nesterov", False) else buf
            updates.append(-lr * d)
            continue
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(optimizer, torch.optim.AdamW)
        if wd and not decoupled:
            g = g + wd * p_data
        beta1, beta2 = (_value(b) for b in group["betas"])
        step = _value(state["step"]) + 1.0 if "step" in state else 1.0
        exp_avg = state.get("exp_avg")
        exp_avg_sq = state.get("exp_avg_sq")
        m = (1 - beta1) * g if exp_avg is None else beta1 * exp_avg[None].to(g.dtype) + (1 - beta1) * g
        v = (1 - beta2) * g * g if exp_avg_sq is None else beta2 * exp_avg_sq[None].to(g.dtype) + (1 - beta2) * g * g
        if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
            v = torch.maximum(state["max_exp_avg_sq"][None].to(g.dtype), v)
        denom = v.sqrt() / (1 - beta2**step) ** 0.5 + _value(group["eps"])
        update = -lr / (1 - beta1**step) * m / denom
        if wd and decoupled:
            update = update - lr * wd * p_data
        updates.append(update)
    return updates, note
