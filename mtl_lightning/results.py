"""The paper table of a sweep: ``mtl-lightning results <root> [--metric-split test] [--format md|csv|latex]``.

Collects every ``results.json`` under ``<root>`` (written by ``mtl-lightning sweep`` through
:meth:`~mtl_lightning.summary.RunSummary.write_results`), groups the runs by method (the run name
without its seed), and prints per method: each task metric's mean ± std over the seeds (sample
standard deviation; 0 for one run) with its direction (↑ higher is better, ↓ lower is better, from
the task's metric spec stored in the file), Δm (↓) and Δ_MTL (↑) where the tasks have baselines,
and the mean rank over the metric columns (MR ↓; ties share their mean rank). The best value of each
column is marked: bold in Markdown and LaTeX, listed in the ``best`` column of the CSV.

``--plots DIR`` also draws (matplotlib, the ``plots`` extra) the Pareto front of two task metrics
across the methods (``--pareto left/accuracy right/accuracy``; default: the first metric of the
first two tasks) and each method's loss weights over training (``train/<task>/weight`` from the
runs' ``metrics.csv``, mean over the seeds).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from mtl_lightning.summary import RESULTS_FILE


class ResultsError(ValueError):
    """Results cannot be read or tabulated; the message names the file or option at fault."""


@dataclass(frozen=True)
class Column:
    """One column of the table: a task metric, Δm, Δ_MTL or the mean rank."""

    key: str  #: ``<task>/<metric>``, ``delta_m``, ``delta_mtl`` or ``mean_rank``
    label: str
    higher_is_better: bool

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass
class Row:
    """One method: the mean and std of each column over its runs."""

    method: str
    runs: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


@dataclass
class Table:
    """A results table: rows in method order, columns, and the best row(s) of each column."""

    split: str
    columns: list[Column]
    rows: list[Row]
    best: dict[str, set[str]]  #: column key -> methods with the best mean


def load_results(root: str) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``root`` (recursively), sorted by path."""
    if not os.path.isdir(root):
        raise ResultsError(f"{root}: no such folder.")
    paths = sorted(glob.glob(os.path.join(root, "**", RESULTS_FILE), recursive=True))
    if not paths:
        raise ResultsError(f"{root}: no {RESULTS_FILE} under it (no finished run yet?).")
    records = []
    for path in paths:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError) as err:
            raise ResultsError(f"{path}: cannot read it ({err}).") from err
        if not isinstance(record, dict) or "splits" not in record or "tasks" not in record:
            raise ResultsError(f"{path}: not a results file of mtl-lightning (no 'splits' / 'tasks').")
        record["_path"] = path
        records.append(record)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ranks(values: dict[str, float], higher_is_better: bool) -> dict[str, float]:
    """1 for the best; tied values share the mean of their ranks."""
    ordered = sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def summarize(records: Sequence[dict[str, Any]], split: str = "test") -> Table:
    """Group ``records`` by method (their ``group``) and aggregate ``split`` (see the module docstring).
    Methods are listed in the order of the sweep (the records' ``index``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    # The sweep's order (methods as in the grid file) where the files have it, else their path order.
    records = sorted(records, key=lambda r: r.get("index", 0) if isinstance(r.get("index"), int) else 0)
    for record in records:
        if split not in record["splits"]:
            raise ResultsError(f"{record['_path'] if '_path' in record else record.get('run')}: no '{split}' metrics "
                               f"(it has {sorted(record['splits'])}); pick another --metric-split.")
        name = str(record.get("group") or record.get("method") or record.get("run"))
        groups.setdefault(name, []).append(record)
    columns: list[Column] = []
    seen: set[str] = set()
    for record in records:
        for task, metrics in record["tasks"].items():
            for metric, spec in metrics.items():
                key = f"{task}/{metric}"
                if key not in seen and metric in record["splits"][split]["metrics"].get(task, {}):
                    seen.add(key)
                    columns.append(Column(key, key, bool(spec["higher_is_better"])))
    if not columns:
        raise ResultsError(f"no task metrics in the '{split}' split of the results files.")
    metric_columns = list(columns)
    rows = []
    for name, runs in groups.items():
        row = Row(name, len(runs))
        for column in metric_columns:
            task, metric = column.key.split("/", 1)
            values = [r["splits"][split]["metrics"].get(task, {}).get(metric) for r in runs]
            if all(v is not None for v in values):
                row.mean[column.key], row.std[column.key] = _mean_std([float(v) for v in values])
        for key in ("delta_m", "delta_mtl"):
            values = [r["splits"][split].get(key) for r in runs]
            if all(v is not None for v in values):
                row.mean[key], row.std[key] = _mean_std([float(v) for v in values])
        rows.append(row)
    if any("delta_m" in r.mean for r in rows):
        columns.append(Column("delta_m", "Δm %", False))
    if any("delta_mtl" in r.mean for r in rows):
        columns.append(Column("delta_mtl", "Δ_MTL %", True))
    rank_sums: dict[str, list[float]] = {r.method: [] for r in rows}
    for column in metric_columns:
        by_method = {r.method: r.mean[column.key] for r in rows if column.key in r.mean}
        for method, rank in _ranks(by_method, column.higher_is_better).items():
            rank_sums[method].append(rank)
    for row in rows:
        if len(rank_sums[row.method]) == len(metric_columns):
            row.mean["mean_rank"] = sum(rank_sums[row.method]) / len(metric_columns)
    columns.append(Column("mean_rank", "MR", False))
    best: dict[str, set[str]] = {}
    for column in columns:
        by_method = {r.method: r.mean[column.key] for r in rows if column.key in r.mean}
        if by_method:
            top = max(by_method.values()) if column.higher_is_better else min(by_method.values())
            best[column.key] = {m for m, v in by_method.items() if v == top}
    return Table(split, columns, rows, best)


def _cell(row: Row, column: Column, digits: int) -> Optional[str]:
    if column.key not in row.mean:
        return None
    mean = row.mean[column.key]
    if column.key == "mean_rank":
        return f"{mean:.2f}"
    if column.key in ("delta_m", "delta_mtl"):
        return f"{mean:+.2f} ± {row.std[column.key]:.2f}"
    return f"{mean:.{digits}f} ± {row.std[column.key]:.{digits}f}"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def format_table(table: Table, fmt: str = "md", digits: int = 4) -> str:
    """The table as Markdown (``md``), ``csv`` or ``latex`` (booktabs)."""
    if fmt == "md":
        head = ["method", "runs", *(f"{c.label} {c.arrow}" for c in table.columns)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table.rows:
            cells = [row.method, str(row.runs)]
            for column in table.columns:
                text = _cell(row, column, digits)
                if text is None:
                    text = "–"
                elif row.method in table.best.get(column.key, ()):
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        head = ["method", "runs"]
        for c in table.columns:
            head += [f"{c.key} {c.arrow}"] if c.key == "mean_rank" else [f"{c.key} {c.arrow} mean", f"{c.key} {c.arrow} std"]
        writer.writerow([*head, "best"])
        for row in table.rows:
            record: list[Any] = [row.method, row.runs]
            for c in table.columns:
                values = [row.mean.get(c.key)] if c.key == "mean_rank" else [row.mean.get(c.key), row.std.get(c.key)]
                record += ["" if v is None else repr(float(v)) for v in values]
            best = [c.key for c in table.columns if row.method in table.best.get(c.key, ())]
            writer.writerow([*record, ";".join(best)])
        return out.getvalue()
    if fmt == "latex":
        arrows = {True: r"$\uparrow$", False: r"$\downarrow$"}
        lines = [r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule"]
        names = {"delta_m": r"$\Delta_m$ \%", "delta_mtl": r"$\Delta_{\mathrm{MTL}}$ \%"}
        head = [names.get(c.key) or _latex_escape(c.label) for c in table.columns]
        lines.append(" & ".join(["Method", *(f"{h} {arrows[c.higher_is_better]}" for h, c in zip(head, table.columns))]) + r" \\")
        lines.append(r"\midrule")
        for row in table.rows:
            cells = [_latex_escape(row.method)]
            for column in table.columns:
                text = _cell(row, column, digits)
                if text is None:
                    cells.append("--")
                    continue
                text = text.replace(" ± ", r" \pm ")
                cells.append(rf"$\mathbf{{{text}}}$" if row.method in table.best.get(column.key, ()) else f"${text}$")
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ResultsError(f"--format {fmt!r}: expected md, csv or latex.")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ResultsError("--plots needs matplotlib: pip install 'mtl-lightning[plots]'.") from err
    return plt


def pareto_front(points: dict[str, tuple[float, float]], up: tuple[bool, bool]) -> list[str]:
    """The methods whose (x, y) no other method dominates (at least as good in both, better in one)."""
    def better_eq(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    front = []
    for m, (x, y) in points.items():
        dominated = any(
            better_eq(ox, x, up[0]) and better_eq(oy, y, up[1]) and (ox, oy) != (x, y)
            for o, (ox, oy) in points.items() if o != m
        )
        if not dominated:
            front.append(m)
    return front


#: Above this many methods the Pareto plot adds a panel zoomed on the front, where labels crowd.
ZOOM_ABOVE = 10


def plot_pareto(table: Table, x: str, y: str, path: str) -> str:
    """Each method's mean (± std) of metrics ``x`` and ``y`` (``<task>/<metric>``); the Pareto front
    joined by a line. With more than :data:`ZOOM_ABOVE` methods a second panel zooms on the region of
    the front (its points ± their std, with a margin). Writes a PNG to ``path``."""
    columns = {c.key: c for c in table.columns}
    for key, option in ((x, "x"), (y, "y")):
        if key not in columns or "/" not in key:
            raise ResultsError(f"--pareto {option}={key!r}: not a task metric of the table ({[k for k in columns if '/' in k]}).")
    plt = _pyplot()
    rows = [r for r in table.rows if x in r.mean and y in r.mean]
    points = {r.method: (r.mean[x], r.mean[y]) for r in rows}
    front = pareto_front(points, (columns[x].higher_is_better, columns[y].higher_is_better))
    zoom = len(points) > ZOOM_ABOVE
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11, 5) if zoom else (5.5, 4.5), squeeze=False)
    line = sorted(points[m] for m in front)
    for ax in axes[0]:
        for row in rows:
            px, py = points[row.method]
            ax.errorbar(px, py, xerr=row.std[x], yerr=row.std[y], fmt="o", capsize=3,
                        color="C3" if row.method in front else "C0")
        ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="C3", lw=1, label="Pareto front")
        ax.set_xlabel(f"{x} {columns[x].arrow}")
        ax.set_ylabel(f"{y} {columns[y].arrow}")
        ax.legend(loc="best", fontsize=8)
    axes[0][0].set_title(f"{table.split}: mean ± std over seeds")
    if zoom:
        ax = axes[0][1]
        front_rows = [r for r in rows if r.method in front]
        lo_x = min(r.mean[x] - r.std[x] for r in front_rows)
        hi_x = max(r.mean[x] + r.std[x] for r in front_rows)
        lo_y = min(r.mean[y] - r.std[y] for r in front_rows)
        hi_y = max(r.mean[y] + r.std[y] for r in front_rows)
        margin_x, margin_y = 0.15 * (hi_x - lo_x or 1e-3), 0.15 * (hi_y - lo_y or 1e-3)
        ax.set_xlim(lo_x - margin_x, hi_x + margin_x)
        ax.set_ylim(lo_y - margin_y, hi_y + margin_y)
        ax.set_title("zoom on the front")
    for ax in axes[0][1:] if zoom else axes[0]:
        x_range, y_range = ax.get_xlim(), ax.get_ylim()
        for method, (px, py) in points.items():
            if x_range[0] <= px <= x_range[1] and y_range[0] <= py <= y_range[1]:
                ax.annotate(method, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            fontweight="bold" if method in front else "normal")
    if zoom:  # the full view labels only the points outside the zoomed region
        x_range, y_range = axes[0][1].get_xlim(), axes[0][1].get_ylim()
        for method, (px, py) in points.items():
            if not (x_range[0] <= px <= x_range[1] and y_range[0] <= py <= y_range[1]):
                axes[0][0].annotate(method, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def weight_trajectories(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{method: {task: [(step, mean weight over the seeds)]}}`` from each run's ``metrics.csv``
    (the ``train/<task>/weight`` columns logged by the balancing methods)."""
    raw: dict[str, dict[str, dict[int, list[float]]]] = {}
    for record in records:
        path = os.path.join(os.path.dirname(record["_path"]), "metrics.csv")
        if not os.path.isfile(path):
            continue
        method = str(record.get("group") or record.get("method") or record.get("run"))
        with open(path, newline="") as f:
            for line in csv.DictReader(f):
                for key, value in line.items():
                    if key and key.startswith("train/") and key.endswith("/weight") and value:
                        task = key[len("train/") : -len("/weight")]
                        raw.setdefault(method, {}).setdefault(task, {}).setdefault(int(line["step"]), []).append(float(value))
    return {
        m: {t: [(s, sum(v) / len(v)) for s, v in sorted(steps.items())] for t, steps in tasks.items()}
        for m, tasks in raw.items()
    }


def plot_weights(records: Sequence[dict[str, Any]], path: str) -> Optional[str]:
    """One panel per method: each task's loss weight over the training steps (mean over the seeds).
    Writes a PNG to ``path``; None when no run folder has a ``metrics.csv`` with weights."""
    curves = weight_trajectories(records)
    if not curves:
        return None
    plt = _pyplot()
    n = len(curves)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, (method, tasks) in zip(axes.flat, curves.items()):
        for task, points in tasks.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=task, lw=1)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7, labelbottom=True)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step", fontsize=8)
    fig.supylabel("loss weight (mean over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``mtl-lightning results`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="mtl-lightning results", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("root", help="a sweep's output root (searched recursively for results.json)")
    parser.add_argument("--metric-split", default="test", help="which split's metrics (test or val; default test)")
    parser.add_argument("--format", default="md", choices=("md", "csv", "latex"))
    parser.add_argument("--digits", type=int, default=4, help="decimals of the task metrics")
    parser.add_argument("--out", help="write the table to this file instead of printing it")
    parser.add_argument("--plots", metavar="DIR", help="also write pareto.png and weights.png into DIR (needs matplotlib)")
    parser.add_argument("--pareto", nargs=2, metavar=("X", "Y"), help="the two <task>/<metric> of the Pareto plot")
    args = parser.parse_args(argv)
    try:
        records = load_results(args.root)
        table = summarize(records, args.metric_split)
        text = format_table(table, args.format, args.digits)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text)
            print(f"Wrote {args.out} ({len(table.rows)} methods, {len(records)} runs)")
        else:
            sys.stdout.write(text)
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            if args.pareto:
                x, y = args.pareto
            else:
                tasks = list(dict.fromkeys(c.key.split("/")[0] for c in table.columns if "/" in c.key))
                if len(tasks) < 2:
                    raise ResultsError("--plots: the Pareto plot needs two tasks; the results have one.")
                x, y = (next(c.key for c in table.columns if c.key.startswith(f"{t}/")) for t in tasks[:2])
            print(f"Wrote {plot_pareto(table, x, y, os.path.join(args.plots, 'pareto.png'))}")
            weights = plot_weights(records, os.path.join(args.plots, "weights.png"))
            print(f"Wrote {weights}" if weights else "No train/<task>/weight in the runs' metrics.csv: no weights plot.")
    except ResultsError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
