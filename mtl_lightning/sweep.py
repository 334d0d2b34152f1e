"""Sweeps: every method × seed × option of a grid, run locally, on SLURM or by ``wandb agent``.

``mtl-lightning sweep --config base.yaml --grid grid.yaml [--jobs N] [--root DIR]`` expands the grid
into runs, each with a deterministic name (``famo-lr=0.001-s2``) and its own folder under the output
root (default ``runs/sweeps/<grid name>``), and runs them. A run whose ``results.json`` exists is
finished and skipped; any other run (new, crashed, preempted) runs again and resumes from the newest
checkpoint in its folder. Each run trains (``fit``), then validates and tests the final model, and
its :class:`~mtl_lightning.summary.RunSummary` writes the per-task metrics, Δ_MTL / Δm and each
metric's direction to ``<run>/results.json``; ``mtl-lightning results <root>`` tabulates them.

The grid file (YAML)::

    name: multidigits            # optional: the sweep's name (default: the grid file's stem)
    config: [base.yaml]          # optional: base config(s), when --config is not given
    methods:                     # name: overlay config | callback class path | mapping
      ew: {}                                         # the base config as it is
      famo: experiments/multidigits/famo.yaml        # a config merged after the base
      uw: mtl_lightning.balancing.UW                 # a balancing callback (added to the base's callbacks)
      dwa: {callback: {class_path: mtl_lightning.balancing.DWA, init_args: {temperature: 2.0}}}
      gn: {config: gradnorm.yaml, options: {model.optimizer.init_args.lr: 0.001}}
    seeds: [0, 1, 2]             # or a count: 3
    grid:                        # dotted options: every combination of the listed values
      model.optimizer.init_args.lr: [0.001, 0.002]
    set:                         # dotted options applied to every run
      trainer.max_epochs: 3
    wandb: {project: my-project} # the W&B logger's options, or false for none (CSV only)

Each run logs to a ``CSVLogger`` in its folder (``metrics.csv``: the loss weights
``train/<task>/weight`` for the weight plots) and, unless ``wandb: false`` / ``--no-wandb``, to the
W&B logger (group: the sweep's name, run name: the run's name).

Launchers: ``--launcher local`` (default; ``--jobs`` processes at once), ``--launcher slurm`` (a
``submitit`` job array, one job per run, that checkpoints and requeues itself on preemption or
timeout; ``--cluster local`` runs the same jobs on this machine) and ``--launcher wandb`` (writes a
W&B sweep config for ``wandb sweep`` / ``wandb agent``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Sequence

import yaml

from mtl_lightning._trainer import trainer_callbacks
from mtl_lightning.monitoring.baselines import _load_merged
from mtl_lightning.summary import RESULTS_FILE  # a run is finished when this file exists in its folder
SPEC_FILE = "sweep_run.json"  #: the run's arguments, written when the sweep is expanded
ATTEMPTS_FILE = "attempts.log"  #: one line per start of the run (time, host, pid, checkpoint)
LOG_FILE = "log.txt"  #: the run's output (local launcher)


class SweepError(ValueError):
    """A grid or a sweep option is invalid; the message names the file and key at fault."""


@dataclass
class Run:
    """One run of a sweep."""

    name: str  #: deterministic: ``<method>[-<option>=<value>…]-s<seed>``
    group: str  #: the name without the seed: what ``results`` aggregates over
    method: str
    seed: int
    options: dict[str, Any]  #: the dotted options of this run (grid and method options)
    configs: list[str]  #: config files, merged in order
    args: list[str]  #: everything after ``fit`` (configs, seed, options, loggers)
    folder: str  #: the run's own folder
    sweep: str = ""  #: the sweep's name
    index: int = 0  #: position in the sweep (the results table lists the methods in this order)

    @property
    def results_path(self) -> str:
        return os.path.join(self.folder, RESULTS_FILE)

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.results_path)

    def command(self) -> str:
        """The equivalent ``mtl-lightning fit`` command (for the log and for reproducing by hand)."""
        return shlex.join(["mtl-lightning", "fit", *self.args])


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "x"


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _resolve(path: str, grid_dir: str, where: str) -> str:
    for candidate in (path, os.path.join(grid_dir, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise SweepError(f"{where}: config file {path!r} not found (relative to the working directory or to the grid file).")


def _check_options(options: Any, where: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise SweepError(f"{where}: expected a mapping of dotted options (model.optimizer.init_args.lr: 0.001), got {options!r}.")
    for key in options:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise SweepError(f"{where}: {key!r} is not a dotted option name.")
    return dict(options)


def _method(name: str, spec: Any, grid_dir: str, where: str) -> dict[str, Any]:
    """``{"configs": [...], "callback": dict|None, "options": {...}}`` of one method entry."""
    if spec is None:
        spec = {}
    if isinstance(spec, str):
        spec = {"config": spec} if spec.endswith((".yaml", ".yml")) else {"callback": spec}
    elif isinstance(spec, dict) and "class_path" in spec:
        spec = {"callback": spec}
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: a method is a config file, a callback class path or a mapping; got {spec!r}.")
    unknown = sorted(set(spec) - {"config", "callback", "options"})
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; a method mapping takes config, callback and options.")
    configs = spec.get("config") or []
    configs = [configs] if isinstance(configs, str) else list(configs)
    callback = spec.get("callback")
    if isinstance(callback, str):
        callback = {"class_path": callback}
    if callback is not None and not (isinstance(callback, dict) and isinstance(callback.get("class_path"), str)):
        raise SweepError(f"{where}.callback: expected a class path or {{class_path: ..., init_args: ...}}, got {callback!r}.")
    return {
        "configs": [_resolve(c, grid_dir, f"{where}.config") for c in configs],
        "callback": callback,
        "options": _check_options(spec.get("options"), f"{where}.options"),
    }


def load_grid(path: str) -> dict[str, Any]:
    """Read and check a grid file (see the module docstring); relative config paths are resolved."""
    try:
        with open(path) as f:
            grid = yaml.safe_load(f) or {}
    except OSError as err:
        raise SweepError(f"--grid {path}: {err.strerror or err}.") from err
    except yaml.YAMLError as err:
        raise SweepError(f"--grid {path}: not valid YAML ({err}).") from err
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: expected a mapping with methods, seeds, grid, set.")
    unknown = sorted(set(grid) - {"name", "config", "methods", "seeds", "grid", "set", "wandb"})
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; a grid has name, config, methods, seeds, grid, set, wandb.")
    grid_dir = os.path.dirname(os.path.abspath(path))
    methods = grid.get("methods") or {"base": {}}
    if isinstance(methods, list):  # a list of overlay files: named by their stems
        methods = {os.path.splitext(os.path.basename(str(m)))[0]: m for m in methods}
    if not isinstance(methods, dict):
        raise SweepError(f"{path}: methods: expected a mapping name: overlay/callback (or a list of overlay files).")
    seeds = grid.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{path}: seeds: expected a list of integers or a count, got {seeds!r}.")
    axes = _check_options(grid.get("grid"), f"{path}: grid")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key}: expected a non-empty list of values, got {values!r}.")
    wandb = grid.get("wandb", {})
    if wandb is not False and not isinstance(wandb, dict):
        raise SweepError(f"{path}: wandb: expected false or a mapping of WandbLogger options, got {wandb!r}.")
    configs = grid.get("config") or []
    configs = [configs] if isinstance(configs, str) else list(configs)
    return {
        "name": _sanitize(str(grid.get("name") or os.path.splitext(os.path.basename(path))[0])),
        "config": [_resolve(c, grid_dir, f"{path}: config") for c in configs],
        "methods": {str(n): _method(str(n), m, grid_dir, f"{path}: methods.{n}") for n, m in methods.items()},
        "seeds": seeds,
        "grid": axes,
        "set": _check_options(grid.get("set"), f"{path}: set"),
        "wandb": wandb,
    }


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two would collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _loggers(folder: str, run_name: str, sweep: str, wandb: Any) -> list[dict[str, Any]]:
    root, version = os.path.split(folder)
    loggers: list[dict[str, Any]] = [
        # First: it decides the run folder (<root>/<run>), where the checkpoints go.
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "", "version": version}}
    ]
    if wandb is not False:
        init = {"save_dir": folder, "name": run_name, "group": sweep, **(wandb or {})}
        # The same W&B run when the run resumes (offline or online).
        init.setdefault("id", hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:16])
        init.setdefault("resume", "allow")
        loggers.append({"class_path": "mtl_lightning.tracking.WandbLogger", "init_args": init})
    return loggers


def expand(grid: dict[str, Any], configs: Sequence[str], root: str, wandb: Optional[bool] = None) -> list[Run]:
    """The runs of a checked grid (:func:`load_grid`) over base ``configs``, in a fixed order:
    methods in file order, then grid values in file order, then seeds."""
    base = [os.path.abspath(c) for c in configs] or grid["config"]
    if not base:
        raise SweepError("--config: no base config given (on the command line or as config: in the grid file).")
    for path in base:
        if not os.path.isfile(path):
            raise SweepError(f"--config {path}: file not found.")
    wandb_options = False if wandb is False else grid["wandb"]
    keys = list(grid["grid"])
    short = _short_keys(keys)
    base_callbacks = None
    runs: list[Run] = []
    names: set[str] = set()
    for method, spec in grid["methods"].items():
        method_args: list[str] = []
        if spec["callback"] is not None:
            if base_callbacks is None:
                callbacks = _load_merged(base).get("trainer", {}).get("callbacks") or []
                base_callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            merged = _load_merged([*base, *spec["configs"]]).get("trainer", {}).get("callbacks") or []
            merged = merged if isinstance(merged, list) else [merged]
            method_args = ["--trainer.callbacks", json.dumps([*merged, spec["callback"]])]
        for values in itertools.product(*(grid["grid"][k] for k in keys)):
            combo = dict(zip(keys, values))
            label = "-".join([_sanitize(method), *(_sanitize(f"{short[k]}={_value_text(v)}") for k, v in combo.items())])
            for seed in grid["seeds"]:
                name = f"{label}-s{seed}"
                if name in names:
                    raise SweepError(f"--grid: two runs would be named {name!r}; make the method names or values distinct.")
                names.add(name)
                folder = os.path.abspath(os.path.join(root, name))
                options = {**grid["set"], **spec["options"], **combo}
                args: list[str] = []
                for path in [*base, *spec["configs"]]:
                    args += ["--config", path]
                args += ["--seed_everything", str(seed), *method_args]
                for key, value in options.items():
                    args += [f"--{key}", _value_text(value)]
                args += ["--trainer.logger", json.dumps(_loggers(folder, name, grid["name"], wandb_options))]
                runs.append(Run(name, label, method, seed, {**spec["options"], **combo}, [*base, *spec["configs"]],
                                args, folder, grid["name"], len(runs)))
    return runs


def prepare(runs: Sequence[Run]) -> None:
    """Create each run's folder and write its ``sweep_run.json`` (what :func:`run_one` reads)."""
    for run in runs:
        os.makedirs(run.folder, exist_ok=True)
        with open(os.path.join(run.folder, SPEC_FILE), "w") as f:
            json.dump({**asdict(run), "command": run.command()}, f, indent=2)
            f.write("\n")


def load_run(folder: str) -> Run:
    """The :class:`Run` prepared in ``folder``."""
    path = os.path.join(folder, SPEC_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as err:
        raise SweepError(f"{path}: {err.strerror or err}; prepare the run with mtl-lightning sweep first.") from err
    names = {f.name for f in fields(Run)}
    return Run(**{k: v for k, v in data.items() if k in names})  # a file of an older version: extra keys ignored


def latest_checkpoint(folder: str) -> Optional[str]:
    """The newest ``*.ckpt`` under ``<folder>/checkpoints`` (None when there is none)."""
    paths = glob.glob(os.path.join(folder, "checkpoints", "*.ckpt"))
    return max(paths, key=os.path.getmtime) if paths else None


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def run_one(folder: str, on_trainer: Any = None) -> dict[str, Any]:
    """Run the prepared run in ``folder`` in this process: fit (resuming from its newest checkpoint),
    validate and test the final model, then write ``results.json``. Returns the results record.
    ``on_trainer(trainer)`` is called with the Trainer before fitting starts (the SLURM job uses it
    to save a checkpoint on preemption)."""
    import warnings

    from mtl_lightning.cli import MTLCLI
    from mtl_lightning.summary import RunSummary

    class _SweepCLI(MTLCLI):
        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer = super().instantiate_trainer(**kwargs)
            if on_trainer is not None:
                on_trainer(trainer)
            return trainer

    run = load_run(folder)
    if run.finished:
        with open(run.results_path) as f:
            return json.load(f)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")  # run_one passes args
    checkpoint = latest_checkpoint(folder)
    with open(os.path.join(folder, ATTEMPTS_FILE), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} host={socket.gethostname()} pid={os.getpid()} "
                f"checkpoint={checkpoint or '-'}\n")
    print(f"[sweep] {run.name}: {'resuming from ' + checkpoint if checkpoint else 'starting'}", flush=True)
    start = time.time()
    cli = _SweepCLI(args=["fit", *run.args] + (["--ckpt_path", checkpoint] if checkpoint else []))  # fits
    trainer = cli.trainer
    trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    summary = next(cb for cb in trainer_callbacks(trainer) if isinstance(cb, RunSummary))
    if not trainer.is_global_zero:
        return {}
    record = summary.write_results(
        run.results_path, run=run.name, group=run.group, method=run.method, seed=run.seed, options=run.options,
        sweep=run.sweep, index=run.index, configs=run.configs, wall_time_s=round(time.time() - start, 1),
    )
    _finish_wandb()
    print(f"[sweep] {run.name}: wrote {run.results_path}", flush=True)
    return record


def run_local(runs: Sequence[Run], jobs: int = 1) -> dict[str, str]:
    """Run the unfinished runs, ``jobs`` processes at once (each ``python -m mtl_lightning.sweep
    --run <folder>``, output in ``<folder>/log.txt``). Returns ``{run name: status}`` with status
    ``skipped`` (finished before), ``done``, ``failed (exit N)`` or ``not started`` (after a run
    failed on its configuration, exit status 2, no further run starts: they would fail alike)."""
    status = {r.name: "skipped" for r in runs if r.finished}
    pending = [r for r in runs if not r.finished]
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    if status:
        print(f"[sweep] {len(status)} finished run(s) skipped (their {RESULTS_FILE} exists)", flush=True)

    config_error = threading.Event()

    def one(run: Run) -> tuple[Run, Optional[int], float]:
        if config_error.is_set():
            return run, None, 0.0
        start = time.time()
        with open(os.path.join(run.folder, LOG_FILE), "a") as log:
            log.write(f"$ {run.command()}\n")
            log.flush()
            proc = subprocess.run([sys.executable, "-m", "mtl_lightning.sweep", "--run", run.folder],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode == 2:
            config_error.set()
        return run, proc.returncode, time.time() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, r) for r in pending]
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run, code, seconds = future.result()
            ok = code == 0 and run.finished
            status[run.name] = "done" if ok else "not started" if code is None else f"failed (exit {code})"
            detail = "" if ok or code is None else f": see {os.path.join(run.folder, LOG_FILE)}"
            took = "" if code is None else f" ({seconds:.0f} s)"
            print(f"[sweep] {n}/{len(pending)} {run.name} {status[run.name]}{took}{detail}", flush=True)
    return {r.name: status[r.name] for r in runs}


def _release_wandb_run() -> None:
    """Mark the W&B run as preempted and close it, so that the requeued attempt, which resumes the same
    run id, is not refused with "run ID is in use" while W&B's service still holds it open."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        run.mark_preempting()
        wandb.finish(exit_code=1)  # type: ignore[union-attr]  # wandb is a module when run is set
    except Exception as err:  # noqa: BLE001 - a W&B failure must not lose the checkpoint just saved
        print(f"[sweep] could not close the W&B run before requeueing: {err}", flush=True)


class SweepJob:
    """What each SLURM (submitit) job runs: :func:`run_one` on a run folder. On preemption or
    timeout submitit calls :meth:`checkpoint`, which saves the training state to
    ``<run>/checkpoints/preempted.ckpt`` and requeues the job, which resumes from it."""

    def __init__(self) -> None:
        self._trainer: Any = None

    def __call__(self, folder: str) -> str:
        run_one(folder, on_trainer=self._keep)
        return folder

    def _keep(self, trainer: Any) -> None:
        self._trainer = trainer

    def checkpoint(self, folder: str) -> Any:
        """Called by submitit in the job's signal handler: save, then requeue the same run."""
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
        from submitit.helpers import DelayedSubmission

        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING:
            path = os.path.join(folder, "checkpoints", "preempted.ckpt")
            trainer.save_checkpoint(path)
            print(f"[sweep] preempted: saved {path}; requeueing", flush=True)
        _release_wandb_run()
        self._trainer = None
        return DelayedSubmission(SweepJob(), folder)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # the trainer stays in the process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._trainer = None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def launch_slurm(
    runs: Sequence[Run], root: str, jobs: int, cluster: Optional[str] = None, parameters: Optional[dict[str, Any]] = None,
) -> list[Any]:
    """Submit the unfinished runs as one submitit job array (``cluster``: None picks SLURM when
    present; ``local`` / ``debug`` run the jobs on this machine). ``parameters`` go to
    ``AutoExecutor.update_parameters`` (``timeout_min``, ``gpus_per_node``, ``slurm_partition``…)."""
    try:
        import submitit
    except ImportError as err:
        raise SweepError("--launcher slurm needs submitit: pip install 'mtl-lightning[slurm]'.") from err
    pending = [r for r in runs if not r.finished]
    if not pending:
        return []
    executor = submitit.AutoExecutor(folder=os.path.join(root, ".submitit", "%j"), cluster=cluster)
    params = {"name": os.path.basename(os.path.abspath(root)), "timeout_min": 60, "tasks_per_node": 1, "nodes": 1,
              "slurm_array_parallelism": max(1, jobs), "slurm_signal_delay_s": 90, **(parameters or {})}
    if params.get("tasks_per_node") != 1 or params.get("nodes") != 1:
        raise SweepError("--slurm: a sweep runs one process per run (tasks_per_node=1, nodes=1); "
                         "for a multi-GPU / multi-node DDP run use experiments/slurm/ddp.sbatch.")
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError) as err:
        raise SweepError(f"--slurm: {err}") from err
    submitted = executor.map_array(SweepJob(), [r.folder for r in pending])
    with open(os.path.join(root, "submitted_jobs.txt"), "a") as f:
        for run, job in zip(pending, submitted):
            f.write(f"{job.job_id} {run.name}\n")
    return submitted


def wandb_sweep_config(
    grid_path: str, configs: Sequence[str], root: str, grid: dict[str, Any], set_options: Sequence[str] = (),
) -> dict[str, Any]:
    """A W&B sweep config (``method: grid``) over the grid's methods, seeds and grid options whose
    agent runs ``mtl-lightning sweep --agent``: each W&B run is the same run, in the same folder,
    as ``--launcher local`` would make."""
    parameters: dict[str, Any] = {"method": {"values": list(grid["methods"])}, "seed": {"values": list(grid["seeds"])}}
    parameters.update({key: {"values": list(values)} for key, values in grid["grid"].items()})
    command = ["${env}", "${interpreter}", "-m", "mtl_lightning", "sweep"]
    for path in configs:
        command += ["--config", os.path.abspath(path)]
    for item in set_options:
        command += ["--set", item]
    command += ["--grid", os.path.abspath(grid_path), "--root", os.path.abspath(root), "--agent", "${args}"]
    project = grid["wandb"].get("project", "mtl-lightning") if isinstance(grid["wandb"], dict) else "mtl-lightning"
    return {"name": grid["name"], "project": project, "method": "grid", "parameters": parameters, "command": command}


def agent_run(runs: Sequence[Run], params: Sequence[str]) -> Run:
    """The run that a W&B agent's ``--method=… --seed=… --<option>=…`` arguments select."""
    chosen: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise SweepError(f"--agent: expected --key=value arguments from wandb agent, got {item!r}.")
        chosen[key] = _parse_value(value)
    for run in runs:
        values = {"method": run.method, "seed": run.seed, **run.options}
        if all(_value_text(values.get(k)) == _value_text(v) for k, v in chosen.items() if k in values) and set(chosen) <= set(values):
            return run
    raise SweepError(f"--agent: no run of the grid matches {chosen}.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``mtl-lightning sweep`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="mtl-lightning sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="The grid file format and the launchers: docs/experiments.md.",
    )
    parser.add_argument("--config", action="append", default=[], help="base config (repeatable, merged in order)")
    parser.add_argument("--grid", help="the grid file (YAML)")
    parser.add_argument("--root", help="output root (default runs/sweeps/<grid name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (local) or the array's parallelism (slurm)")
    parser.add_argument("--launcher", choices=("local", "slurm", "wandb"), default="local")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="a dotted option for every run, after all configs (value: YAML/JSON); repeatable")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV only (no W&B logger)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands; run nothing")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), help="slurm launcher: where the jobs run")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="submitit parameter (timeout_min=240, gpus_per_node=1, slurm_partition=gpu…); repeatable")
    parser.add_argument("--wait", action="store_true", help="slurm launcher: wait for the jobs (always with --cluster local/debug)")
    parser.add_argument("--out", help="wandb launcher: where to write the sweep config (default <root>/wandb_sweep.yaml)")
    parser.add_argument("--run", metavar="FOLDER", help=argparse.SUPPRESS)  # one prepared run, in this process
    parser.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)  # called by wandb agent
    args, rest = parser.parse_known_args(argv)
    try:
        if rest and not args.agent:
            raise SweepError(f"unrecognized arguments: {' '.join(rest)}")
        if args.run:
            from mtl_lightning.cli import config_error_message, traceback_requested

            try:
                run_one(args.run)
            except Exception as err:
                message = config_error_message(err)
                if message is None or traceback_requested():
                    raise
                sys.stderr.write(message + "\n")
                sys.exit(2)
            return
        if not args.grid:
            raise SweepError("--grid is required (the grid file: methods, seeds, options).")
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: expected at least 1.")
        grid = load_grid(args.grid)
        for item in args.set_options:
            key, sep, value = item.partition("=")
            if not sep:
                raise SweepError(f"--set {item!r}: expected KEY=VALUE (a dotted option such as trainer.max_epochs=2).")
            _check_options({key: None}, f"--set {item!r}")
            grid["set"][key] = _parse_value(value)
        root = args.root or os.path.join("runs", "sweeps", grid["name"])
        runs = expand(grid, args.config, root, wandb=False if args.no_wandb else None)
        if args.agent:
            run = agent_run(runs, rest)
            prepare([run])
            run_one(run.folder)
            return
        if args.dry_run:
            for run in runs:
                print(f"{run.name}{'  (finished)' if run.finished else ''}\n  {run.command()}")
            print(f"{len(runs)} runs under {root}")
            return
        if args.launcher == "wandb":
            out = args.out or os.path.join(root, "wandb_sweep.yaml")
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                f.write(f"# W&B sweep over {args.grid}: wandb sweep {out}; then wandb agent <entity/project/sweep id>\n")
                config = wandb_sweep_config(args.grid, args.config or grid["config"], root, grid, args.set_options)
                yaml.safe_dump(config, f, sort_keys=False)
            print(f"Wrote {out} ({len(runs)} runs). Start it with: wandb sweep {out}  then: wandb agent <sweep id>")
            return
        os.makedirs(root, exist_ok=True)
        prepare(runs)
        print(f"[sweep] {len(runs)} runs under {root}", flush=True)
        if args.launcher == "slurm":
            parameters = {}
            for item in args.slurm:
                key, sep, value = item.partition("=")
                if not sep or not key:
                    raise SweepError(f"--slurm {item!r}: expected KEY=VALUE.")
                parameters[key] = _parse_value(value)
            submitted = launch_slurm(runs, root, args.jobs, args.cluster, parameters)
            print(f"[sweep] submitted {len(submitted)} job(s): {' '.join(str(j.job_id) for j in submitted) or '-'} "
                  f"(list in {os.path.join(root, 'submitted_jobs.txt')})", flush=True)
            if args.wait or args.cluster in ("local", "debug"):
                failed = 0
                for job in submitted:
                    try:
                        job.result()
                    except Exception as err:  # noqa: BLE001 - report every failed job, then exit 1
                        failed += 1
                        print(f"[sweep] job {job.job_id} failed: {str(err).strip().splitlines()[-1:]}", flush=True)
                if failed:
                    sys.exit(1)
            return
        status = run_local(runs, args.jobs)
        if any(s.startswith("failed") or s == "not started" for s in status.values()):
            sys.exit(1)
    except SweepError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
