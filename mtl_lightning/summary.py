"""A short run summary printed at the end of ``fit`` / ``validate`` / ``test`` (rank zero only).

It tells what the run did and where it went: each task's final metrics, Δ_MTL / Δm where the tasks
have single-task baselines, the run folder and its saved config, the checkpoint(s), and the W&B run
(or the offline run's folder and its ``wandb sync`` command). ``mtl-lightning`` adds it to every
run; add ``mtl_lightning.summary.RunSummary`` to the Trainer's callbacks to get it elsewhere.

The same callback keeps what it printed as data (:attr:`RunSummary.results`): each split's final
per-task metrics, Δ_MTL / Δm and each metric's direction and baseline. :meth:`RunSummary.write_results`
writes them to a run's ``results.json`` (what ``mtl-lightning sweep`` does at the end of each run and
``mtl-lightning results`` tabulates).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from mtl_lightning._trainer import trainer_callbacks

#: Version of the ``results.json`` layout written by :meth:`RunSummary.write_results`.
RESULTS_FORMAT = 1
#: The results file's name in a run folder (``mtl-lightning sweep`` writes it; ``results`` reads it).
RESULTS_FILE = "results.json"

#: Metric keys that are not a task's result (per-step or per-weight logs).
_SKIP_SUFFIXES = ("_step", "/weight")


def _value(x: Any) -> Optional[float]:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _path(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def task_metrics(metrics: Mapping[str, Any], prefix: str, tasks: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from logged keys ``<prefix>/<task>/<metric>``."""
    out: dict[str, dict[str, float]] = {}
    for key, raw in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != prefix or key.endswith(_SKIP_SUFFIXES):
            continue
        if tasks is not None and parts[1] not in tasks:
            continue
        value = _value(raw)
        if value is not None:
            out.setdefault(parts[1], {})[parts[2]] = value
    if tasks is not None:
        return {t: out[t] for t in tasks if t in out}
    return out


def format_summary(
    stage: str,
    metrics: Mapping[str, Any],
    tasks: Optional[list[str]] = None,
    run_dir: Optional[str] = None,
    config_path: Optional[str] = None,
    checkpoints: Optional[Mapping[str, Optional[str]]] = None,
    wandb: Optional[str] = None,
) -> str:
    """The summary text (see the module docstring)."""
    prefixes = {"fit": ("val", "train"), "validate": ("val",), "test": ("test",)}.get(stage, (stage,))
    lines = [f"Run summary ({stage})"]
    prefix, per_task = prefixes[0], {}
    for prefix in prefixes:
        per_task = task_metrics(metrics, prefix, tasks)
        if per_task:
            break
    width = max((len(f"{prefix}/{t}") for t in per_task), default=0)
    for task, values in per_task.items():
        ordered = sorted(values, key=lambda m: (m in ("loss", "delta"), m))
        text = "  ".join(f"{m} {_fmt(values[m])}" if m != "delta" else f"Δ {values[m]:+.2f} %" for m in ordered)
        lines.append(f"  {prefix + '/' + task:<{width}}  {text}")
    if not per_task:
        lines.append("  (no task metrics were logged)")
    delta_m, delta_mtl = _value(metrics.get(f"{prefix}/delta_m")), _value(metrics.get(f"{prefix}/delta_mtl"))
    if delta_m is not None or delta_mtl is not None:
        parts = []
        if delta_m is not None:
            parts.append(f"Δm {delta_m:+.2f} % (lower is better)")
        if delta_mtl is not None:
            parts.append(f"Δ_MTL {delta_mtl:+.2f} % (higher is better)")
        lines.append(f"  {prefix} vs baselines: " + ", ".join(parts))
    if run_dir:
        config = f"  (config: {_path(config_path)})" if config_path else ""
        lines.append(f"  run folder  {_path(run_dir)}{config}")
    if checkpoints:
        shown = {k: _path(v) for k, v in checkpoints.items() if v}
        if len(set(shown.values())) == 1:
            shown = {next(iter(shown)): next(iter(shown.values()))}
        if shown:
            lines.append("  checkpoint  " + ", ".join(f"{k}: {v}" for k, v in shown.items()))
    if wandb:
        lines.append(f"  W&B         {wandb}")
    return "\n".join(lines)


class RunSummary(Callback):
    """Prints :func:`format_summary` when ``fit`` / ``validate`` / ``test`` ends (rank zero only).

    ``started`` tells whether the stage got past set-up (the CLI uses it to print an error raised
    during set-up as one message).
    """

    def __init__(self) -> None:
        self.started = False
        self.last: Optional[str] = None  #: the last summary printed
        #: ``{split: {"metrics": {task: {metric: v}}, "loss": {task: v}, "delta": {task: Δ_t},
        #: "delta_m": v, "delta_mtl": v}}`` of the last fit / validate / test (``val``, ``test``).
        self.results: dict[str, dict[str, Any]] = {}
        #: ``{task: {metric: {"higher_is_better": bool, "baseline": float or None}}}``
        self.metric_specs: dict[str, dict[str, dict[str, Any]]] = {}
        self.progress: dict[str, int] = {}  #: ``epoch`` and ``global_step`` at the end of the last stage

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.started = False

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = True

    on_fit_start = on_sanity_check_start = on_validation_start = on_test_start = on_predict_start = _start

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if stage not in ("fit", "validate", "test") or not trainer.is_global_zero:
            return
        tasks = getattr(pl_module, "tasks", None)
        task_names = list(tasks) if isinstance(tasks, Mapping) else None
        run_dir = config_path = wandb = None
        from mtl_lightning.tracking import RunConfigCallback, WandbLogger, run_directory

        try:
            run_dir = run_directory(trainer)
        except Exception:  # noqa: BLE001 - a summary never fails a run
            run_dir = None
        for cb in trainer_callbacks(trainer):
            if isinstance(cb, RunConfigCallback) and cb.config_path:
                config_path = cb.config_path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                wandb = logger.describe()
        checkpoints: dict[str, Optional[str]] = {}
        if stage == "fit":
            ckpt = trainer.checkpoint_callback
            if ckpt is not None:
                checkpoints = {"best": getattr(ckpt, "best_model_path", None), "last": getattr(ckpt, "last_model_path", None)}
        elif trainer.ckpt_path:
            checkpoints = {"loaded": str(trainer.ckpt_path)}
        metrics = dict(trainer.callback_metrics)
        self._record(metrics, tasks if isinstance(tasks, Mapping) else {}, task_names)
        self.progress = {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step)}
        self.last = format_summary(stage, metrics, task_names, run_dir, config_path, checkpoints, wandb)
        print(self.last, flush=True)

    def _record(self, metrics: Mapping[str, Any], tasks: Mapping[str, Any], task_names: Optional[list[str]]) -> None:
        for name, task in tasks.items():
            directions = getattr(task, "higher_is_better", None)
            if callable(directions):
                baselines = dict(getattr(task, "baselines", None) or {})
                self.metric_specs[name] = {
                    m: {"higher_is_better": bool(up), "baseline": baselines.get(m)} for m, up in directions().items()
                }
        for split in ("val", "test"):
            per_task = task_metrics(metrics, split, task_names)
            if not per_task:
                continue
            entry: dict[str, Any] = {"metrics": {}, "loss": {}, "delta": {}}
            for task, values in per_task.items():
                for key, value in values.items():
                    if key in ("loss", "delta"):
                        entry[key][task] = value
                    else:
                        entry["metrics"].setdefault(task, {})[key] = value
            for key in ("delta_m", "delta_mtl"):
                aggregate = _value(metrics.get(f"{split}/{key}"))
                if aggregate is not None:
                    entry[key] = aggregate
            self.results[split] = entry

    def write_results(self, path: str, **meta: Any) -> dict[str, Any]:
        """Write the recorded results with ``meta`` (run name, method, seed…) to ``path`` (JSON,
        written to a temporary file and renamed: the file exists only once it is complete)."""
        record = {"format": RESULTS_FORMAT, **meta, "tasks": self.metric_specs, **self.progress, "splits": self.results}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
        return record
