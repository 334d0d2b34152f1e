"""Δ_MTL: the relative performance of a multi-task model against single-task baselines.

Two conventions are in use:

* Maninis et al. 2019 (arXiv 1904.08492): Δ_MTL = (1/T) Σ_t (1/M_t) Σ_m (−1)^{l_m} (M_mtl − M_stl)/M_stl × 100,
  l_m = 1 when lower is better. Tasks are averaged after their metrics; **higher is better**.
* Nash-MTL / CAGrad / FAMO: Δm% = −(1/K) Σ_k (−1)^{l_k} (M_mtl,k − M_stl,k)/M_stl,k × 100 over all K
  metrics at once; **lower is better**.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class DeltaResult:
    per_task: dict[str, float]  #: Δ_t of each task (%; positive: better than its baseline)
    delta_mtl: float  #: Maninis convention (%; higher is better)
    delta_m: float  #: Nash-MTL convention (%; lower is better)


def relative_gain(value: float, baseline: float, higher_is_better: bool) -> float:
    """(−1)^{l}(value − baseline)/baseline × 100: positive when ``value`` beats ``baseline``."""
    if baseline == 0:
        raise ValueError("A single-task baseline of 0 makes the relative Δ undefined.")
    sign = 1.0 if higher_is_better else -1.0
    return sign * (value - baseline) / abs(baseline) * 100.0


def delta_mtl(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> Optional[DeltaResult]:
    """Δ of each task and both aggregate conventions, over the metrics that have a baseline.

    Args:
        results: ``{task: {metric: value}}`` of the multi-task model.
        baselines: ``{task: {metric: single-task value}}``.
        higher_is_better: ``{task: {metric: direction}}``.

    Returns None when no metric of ``results`` has a baseline.
    """
    per_task: dict[str, float] = {}
    all_terms: list[float] = []
    for task, task_baselines in baselines.items():
        if task not in results:
            continue
        terms = []
        for metric, base in task_baselines.items():
            if metric not in results[task]:
                raise KeyError(f"Task '{task}': baseline for metric '{metric}', which the task does not report.")
            terms.append(relative_gain(results[task][metric], base, higher_is_better[task][metric]))
        if terms:
            per_task[task] = sum(terms) / len(terms)
            all_terms.extend(terms)
    if not per_task:
        return None
    return DeltaResult(
        per_task=per_task,
        delta_mtl=sum(per_task.values()) / len(per_task),
        delta_m=-sum(all_terms) / len(all_terms),
    )
