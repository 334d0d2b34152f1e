"""Rendering of the negative-transfer signals: heatmap PNGs and the end-of-training report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Sequence

from torch import Tensor

#: How to get matplotlib, which draws every PNG the library writes (an optional extra).
PLOTS_HINT = 'pip install "mtl-lightning[plots]"'


def plots_available() -> bool:
    """Whether matplotlib can be imported, found without importing it (cheap at set-up)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


class HeatmapWriter:
    """Writes annotated heatmap PNGs (diverging colours centred on 0; rows are sources, columns
    targets) and keeps one figure per (task names, axis labels): a later image of the same kind
    only updates the colours, the numbers and the title, then draws.

    Cost matters because the monitor draws inside ``trainer.fit``: margins are computed from the
    label lengths instead of a layout pass, and PNGs are written with light compression. matplotlib
    is imported here, without pyplot, so that the monitor never changes the user's plotting backend
    and costs nothing when plots are off.
    """

    def __init__(self, dpi: int = 100) -> None:
        self.dpi = dpi
        self._figures: dict[tuple, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # figures stay behind when the monitor is pickled (ddp_spawn)
        return {"dpi": self.dpi, "_figures": {}}

    def _figure(self, task_names: Sequence[str], xlabel: str, ylabel: str) -> dict[str, Any]:
        key = (tuple(task_names), xlabel, ylabel)
        if key in self._figures:
            return self._figures[key]
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(task_names)
        longest = max(len(name) for name in task_names)
        char = 10 / 72 * 0.6  # inches per character of 10-pt text
        left = 0.45 + char * longest  # y tick labels and the y label
        bottom = 0.45 + char * longest * 0.71  # x tick labels at 45° and the x label
        width, height = left + 0.55 * n + 1.0, bottom + 0.55 * n + 0.45  # + colour bar, + title
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((left / width, bottom / height, 0.55 * n / width, 0.55 * n / height))
        image = ax.imshow([[0.0] * n] * n, cmap="RdBu", vmin=-1.0, vmax=1.0)
        ax.set_xticks(range(n), labels=list(task_names), rotation=45, ha="right")
        ax.set_yticks(range(n), labels=list(task_names))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        colorbar_axes = fig.add_axes(((left + 0.55 * n + 0.15) / width, bottom / height, 0.15 / width, 0.55 * n / height))
        fig.colorbar(image, cax=colorbar_axes)
        entry = {
            "figure": fig,
            "image": image,
            "title": ax.set_title(""),
            "texts": [[ax.text(j, i, "", ha="center", va="center", fontsize=8) for j in range(n)] for i in range(n)],
        }
        self._figures[key] = entry
        return entry

    def save(self, matrix: Tensor, task_names: Sequence[str], title: str, path: str, xlabel: str, ylabel: str) -> str:
        """Write ``matrix`` (T, T) as a heatmap PNG at ``path`` and return ``path``."""
        values = matrix.detach().double().cpu()
        if values.shape != (len(task_names), len(task_names)):
            raise ValueError(f"HeatmapWriter: matrix of shape {tuple(values.shape)} for {len(task_names)} tasks.")
        finite = values[values.isfinite()]
        limit = float(finite.abs().max()) if finite.numel() else 1.0
        limit = limit if limit > 0 else 1.0
        entry = self._figure(task_names, xlabel, ylabel)
        entry["image"].set_data(values.numpy())
        entry["image"].set_clim(-limit, limit)
        entry["title"].set_text(title)
        for i, row in enumerate(entry["texts"]):
            for j, text in enumerate(row):
                v = float(values[i, j])
                text.set_text("–" if math.isnan(v) else f"{v:.2g}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        entry["figure"].savefig(path, dpi=self.dpi, pil_kwargs={"compress_level": 1})
        return path


def save_heatmap(matrix: Tensor, task_names: Sequence[str], title: str, path: str, xlabel: str, ylabel: str) -> str:
    """Write ``matrix`` as an annotated heatmap PNG and return ``path`` (one-off :class:`HeatmapWriter`)."""
    return HeatmapWriter().save(matrix, task_names, title, path, xlabel, ylabel)


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
