"""Single-task baselines with the same budget as a multi-task config.

``python -m mtl_lightning.monitoring.baselines --config X.yaml --out baselines.yaml`` trains each
task of the config alone — same encoder, data, optimizer and Trainer settings, the other tasks
removed — validates it, and writes ``{task: {metric: value}}`` to ``--out``. Point the
monitor's ``baselines_file`` (or the tasks' ``baselines``) at it to get Δ per task at each
validation. The runs use no logger and no checkpoints unless ``--keep-logger`` is given.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from typing import Any, Optional, Sequence

import yaml


_MONITOR = "mtl_lightning.monitoring.negative_transfer.NegativeTransferMonitor"


def _load_merged(configs: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in configs:
        with open(path) as f:
            _deep_update(merged, yaml.safe_load(f) or {})
    return merged


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def _task_name(task: Any) -> str:
    name = task.get("init_args", {}).get("name") if isinstance(task, dict) else None
    if not name:
        raise ValueError(f"Every task in model.tasks needs init_args.name to train it alone; got {task!r}.")
    return name


def _is_monitor(callback: Any) -> bool:
    path = callback.get("class_path", "") if isinstance(callback, dict) else ""
    return path.endswith("NegativeTransferMonitor")


def single_task_config(config: dict[str, Any], task: str, keep_logger: bool = False) -> dict[str, Any]:
    """``config`` with only ``task`` in ``model.tasks`` and no negative-transfer monitor."""
    single = copy.deepcopy(config)
    tasks = single.get("model", {}).get("tasks")
    if not tasks:
        raise ValueError("The config has no model.tasks to train alone.")
    single["model"]["tasks"] = [t for t in tasks if _task_name(t) == task]
    if not single["model"]["tasks"]:
        raise ValueError(f"Task '{task}' is not in the config's model.tasks ({[_task_name(t) for t in tasks]}).")
    trainer = single.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [c for c in (callbacks if isinstance(callbacks, list) else [callbacks]) if not _is_monitor(c)]
    if not keep_logger:
        trainer["logger"] = False
        trainer["enable_checkpointing"] = False
    return single


def train_single_task_baselines(
    configs: Sequence[str], tasks: Optional[Sequence[str]] = None, keep_logger: bool = False, extra_args: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """Train each task alone with the config's budget; return its validation metrics per task."""
    config = _load_merged(configs)
    all_tasks = [_task_name(t) for t in config.get("model", {}).get("tasks", [])]
    chosen = list(tasks) if tasks else all_tasks
    unknown = sorted(set(chosen) - set(all_tasks))
    if unknown:
        raise ValueError(f"--tasks names unknown task(s) {unknown}; the config's tasks are {all_tasks}.")
    from mtl_lightning.cli import MTLCLI  # the CLI sits above the monitoring package, not below it

    baselines: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in chosen:
            path = os.path.join(tmp, f"{task}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(single_task_config(config, task, keep_logger), f)
            cli = MTLCLI(args=["--config", path, *extra_args], run=False)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            prefix = f"val/{task}/"
            baselines[task] = {
                k[len(prefix):]: float(v) for k, v in results.items() if k.startswith(prefix) and k[len(prefix):] != "loss"
            }
    return baselines


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="Multi-task config (repeatable, merged in order).")
    parser.add_argument("--out", required=True, help="YAML file to write {task: {metric: value}} to.")
    parser.add_argument("--tasks", nargs="*", help="Only these tasks (default: all).")
    parser.add_argument("--keep-logger", action="store_true", help="Keep the config's logger and checkpoints.")
    args, extra = parser.parse_known_args(argv)
    baselines = train_single_task_baselines(args.config, args.tasks, args.keep_logger, extra)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"# Single-task baselines (validation metrics), same budget as {', '.join(args.config)}.\n")
        yaml.safe_dump(baselines, f, sort_keys=True)
    print(f"Wrote baselines of {sorted(baselines)} to {args.out}")


if __name__ == "__main__":
    main()
