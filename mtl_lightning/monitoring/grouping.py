"""TAG's network selection (Fifty et al. 2021, arXiv 2109.04617): split the tasks into networks
(groups trained together) so that each task receives as much inter-task affinity as possible from
the other tasks of its network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

#: Exhaustive search over set partitions: Bell(10) = 115,975 candidates is the largest we enumerate.
MAX_TASKS_EXHAUSTIVE = 10
_TIE = 1e-12


@dataclass(frozen=True)
class Grouping:
    groups: list[list[str]]  #: Task names of each network.
    score: float  #: Mean over tasks of the affinity each task receives from its network.
    received: dict[str, float]  #: Affinity each task receives from the rest of its network.


def _partitions(items: list[int], max_blocks: int) -> Iterator[list[list[int]]]:
    """Set partitions of ``items`` into at most ``max_blocks`` blocks (each exactly once)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest, max_blocks):
        for k in range(len(partition)):
            yield partition[:k] + [[first, *partition[k]]] + partition[k + 1 :]
        if len(partition) < max_blocks:
            yield [[first], *partition]


def received_affinity(affinity: Tensor, group: Sequence[int], target: int) -> float:
    """Mean affinity Z_{i→target} over the other members i of ``group`` (0 for a task alone:
    alone it trains as its single-task baseline and receives no transfer)."""
    sources = [i for i in group if i != target]
    if not sources:
        return 0.0
    return float(torch.stack([affinity[i, target] for i in sources]).mean())


def select_networks(affinity: Tensor, task_names: Sequence[str], max_networks: Optional[int] = None) -> Grouping:
    """Best partition of the tasks into at most ``max_networks`` networks.

    ``affinity[i, j]`` is Z_{i→j} (the affinity task i gives task j; NaN entries count as 0). The
    score of a partition is the mean over tasks of :func:`received_affinity`; ties go to fewer
    networks. Exhaustive over all set partitions, so limited to ``MAX_TASKS_EXHAUSTIVE`` tasks.

    Against TAG's official selection (``google-research/tag/network_selection``): the per-task score
    is the same, the affinity onto the task averaged over the other members of its network. TAG
    scores a task alone −10⁶ (never chosen) and lets networks overlap, each task served by its best
    network under a budget; here networks are disjoint and a task alone scores 0 ("receives no other
    task's gradient"). That baseline assumes Z without a per-target offset, i.e. measured against
    the optimizer's zero-gradient step (the monitor's default): TAG's reference adds the shared
    momentum step's effect to every Z_{i→j} of a target j, which TAG's own rule, never comparing
    with a task alone, ignores.
    """
    names = list(task_names)
    n = len(names)
    if affinity.shape != (n, n):
        raise ValueError(f"select_networks: affinity of shape {tuple(affinity.shape)} for {n} tasks {names}.")
    if n > MAX_TASKS_EXHAUSTIVE:
        raise ValueError(
            f"select_networks: exhaustive search is limited to {MAX_TASKS_EXHAUSTIVE} tasks, got {n}; "
            "group a subset of the tasks or cluster the affinity matrix instead."
        )
    budget = n if max_networks is None else max_networks
    if budget < 1:
        raise ValueError(f"select_networks: max_networks must be >= 1, got {max_networks}.")
    affinity = torch.nan_to_num(affinity.double().cpu(), nan=0.0)
    best: Optional[tuple[float, int, list[list[int]]]] = None
    for partition in _partitions(list(range(n)), budget):
        score = sum(received_affinity(affinity, g, t) for g in partition for t in g) / n
        better = best is None or score > best[0] + _TIE
        tie_with_fewer = best is not None and abs(score - best[0]) <= _TIE and len(partition) < best[1]
        if better or tie_with_fewer:
            best = (score, len(partition), partition)
    assert best is not None
    partition = sorted((sorted(g) for g in best[2]), key=lambda g: g[0])
    return Grouping(
        groups=[[names[i] for i in g] for g in partition],
        score=best[0],
        received={names[t]: received_affinity(affinity, g, t) for g in partition for t in g},
    )
