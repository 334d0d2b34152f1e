"""Rendering of the negative-transfer signals: heatmap PNGs and the end-of-training report."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from torch import Tensor


def save_heatmap(matrix: Tensor, task_names: Sequence[str], title: str, path: str, xlabel: str, ylabel: str) -> str:
    """Write ``matrix`` as an annotated heatmap PNG (diverging colours centred on 0) and return ``path``.

    Rows are sources, columns targets. matplotlib is imported here, without pyplot, so that the
    monitor never changes the user's plotting backend and costs nothing when plots are off.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = matrix.detach().double().cpu()
    finite = values[values.isfinite()]
    limit = float(finite.abs().max()) if finite.numel() else 1.0
    limit = limit if limit > 0 else 1.0
    n = len(task_names)
    fig = Figure(figsize=(1.2 + 0.8 * n, 1.0 + 0.7 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(n), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(task_names))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            v = float(values[i, j])
            ax.text(j, i, "–" if math.isnan(v) else f"{v:.2g}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _matrix_table(matrix: list[list[float]], names: Sequence[str], corner: str) -> list[str]:
    lines = [f"| {corner} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, matrix):
        lines.append(f"| **{name}** | " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: matrices as tables, flagged tasks with their evidence, the grouping."""
    names = report["tasks"]
    lines = [
        "# Negative-transfer report",
        "",
        f"{report['measurements']} measurements every {report['interval']} steps; "
        f"last step {report['global_step']}; action on flag: `{report['action']}`.",
        "",
        "## Average inter-task affinity Z(i→j) (TAG; row helps column when > 0)",
        "",
        *_matrix_table(report["affinity"], names, "i → j"),
        "",
        "## Average gradient cosine",
        "",
        *_matrix_table(report["cosine"], names, "cos"),
        "",
        "## Conflict rate (fraction of measurements with cos < 0)",
        "",
        *_matrix_table(report["conflict_rate"], names, "conflict"),
        "",
        "## Flagged tasks",
        "",
    ]
    if report["flagged"]:
        lines += ["| step | epoch | task | rule | action | evidence |", "|---|---|---|---|---|---|"]
        for f in report["flagged"]:
            evidence = json.dumps(f["evidence"], default=_fmt)
            lines.append(f"| {f['step']} | {f['epoch']} | {f['task']} | {f['rule']} | {f['action']} | `{evidence}` |")
    else:
        lines.append("None: no task met a negative-transfer rule.")
    if report.get("final_delta"):
        lines += ["", "## Δ against single-task baselines at the last validation (%)", ""]
        lines += [f"- {task}: {_fmt(value)}" for task, value in report["final_delta"].items()]
    grouping = report.get("grouping")
    lines += ["", "## Recommended networks (TAG network selection)", ""]
    if grouping is None:
        lines.append(report.get("grouping_note", "Not computed."))
    else:
        for group in grouping["groups"]:
            lines.append(f"- {{{', '.join(group)}}}")
        lines.append(f"\nScore (mean affinity each task receives from its network): {_fmt(grouping['score'])}")
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], directory: str) -> tuple[str, str]:
    """Write ``negative_transfer_report.json`` and ``.md`` into ``directory``; return both paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, "negative_transfer_report.json")
    md_path = os.path.join(directory, "negative_transfer_report.md")
    with open(json_path, "w") as f:
        json.dump(json_safe(report), f, indent=2, default=str, allow_nan=False)
    with open(md_path, "w") as f:
        f.write(render_markdown(report))
    return json_path, md_path
