"""Check an architecture's declared roles against what autograd does on a real batch."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def check_roles(module: Any, batch: Mapping[str, Any]) -> dict[str, set[str]]:
    """Verify a ``MultiTaskModule``'s parameter roles on ``batch`` and return, by parameter name,
    the tasks whose loss reaches it (through the autograd graph).

    Shared parameters must be reached by every task, a task's own parameters and head by that task
    alone, mixing parameters by some task; where the architecture has a shared representation z,
    z must depend on shared parameters only and each task's read of z on none. Raises
    ``ValueError`` listing every violation: use it to test a new architecture.
    """
    _, _, losses = module.compute_losses(batch, "train")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not n.startswith("balancing_parameters.")]
    params = [p for _, p in named]
    reached: dict[str, set[str]] = {n: set() for n, _ in named}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for (name, _), grad in zip(named, grads):
            if grad is not None:
                reached[name].add(task)
    by_id = {id(p): n for n, p in named}
    roles = module.architecture.parameter_roles()  # the declaration itself
    tasks = set(losses)
    problems: list[str] = []

    def expect(params: list, allowed: str, ok: Any) -> None:
        for p in (p for p in params if id(p) in by_id):  # trainable ones
            name = by_id[id(p)]
            if not ok(reached[name]):
                problems.append(f"{name} is declared {allowed} but is reached by {sorted(reached[name]) or 'no task'}")

    expect(roles.shared, "shared", lambda r: r == tasks)
    expect(roles.mixing, "mixing", lambda r: bool(r))
    for task in module.task_names:
        own = [*roles.task_own.get(task, []), *[p for p in module.heads[task].parameters() if p.requires_grad]]
        expect(own, f"task-own of '{task}'", lambda r, t=task: r == {t} if t in tasks else not r)
    arch = module.architecture
    if arch.has_representation:
        x = module._input(batch)
        z = arch.represent(x)
        if isinstance(z, Tensor):
            shared_ids = {id(p) for p in roles.shared}
            unshared = [p for p in params if id(p) not in shared_ids]
            upstream = torch.autograd.grad(z.float().sum(), unshared, allow_unused=True) if unshared else []
            problems += [f"the representation depends on unshared parameter {by_id[id(p)]}"
                         for p, g in zip(unshared, upstream) if g is not None]
            probe = z.detach().requires_grad_(True)
            for task in module.task_names:
                out = arch.read(probe, x, task).float().sum()
                grads = torch.autograd.grad(out, roles.shared, allow_unused=True) if roles.shared else []
                problems += [f"task '{task}' reads shared parameter {by_id[id(p)]} outside the representation"
                             for p, g in zip(roles.shared, grads) if g is not None]
    if problems:
        raise ValueError(f"{type(arch).__name__}: declared roles disagree with the gradients: " + "; ".join(problems))
    return reached
