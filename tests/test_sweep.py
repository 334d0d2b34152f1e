"""``mtl-lightning sweep``: grid expansion (names, arguments, errors), a local 2 methods × 2 seeds
sweep that skips finished runs and resumes a crashed one, its table checked against the runs' own
results files, the submitit launcher (LocalExecutor standing in for SLURM) requeueing a preempted
run that resumes its checkpoint, and the W&B sweep config."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest
import yaml

from mtl_lightning.cli import main as cli_main
from mtl_lightning.sweep import SweepError, agent_run, expand, latest_checkpoint, launch_slurm, load_grid, prepare

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "multidigits" / "ew.yaml")
FAMO = str(ROOT / "experiments" / "multidigits" / "famo.yaml")
TINY = {
    "trainer.max_epochs": 2, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
    "trainer.limit_test_batches": 1, "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False, "data.init_args.num_train": 256, "data.init_args.num_val": 64,
    "data.init_args.num_test": 64, "data.init_args.batch_size": 64,
}


def _grid(path: Path, **grid) -> str:
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


@pytest.fixture
def subprocess_env(monkeypatch):
    """Runs and jobs are subprocesses: they import this checkout (and the tests' helpers)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_grid_expands_into_named_runs_in_a_fixed_order(tmp_path):
    overlay = tmp_path / "slow.yaml"
    overlay.write_text("trainer:\n  max_epochs: 9\n")
    grid = load_grid(_grid(
        tmp_path / "g.yaml", name="demo",
        methods={"ew": {}, "famo": FAMO, "uw": "mtl_lightning.balancing.UW",
                 "dwa": {"config": "slow.yaml", "callback": {"class_path": "mtl_lightning.balancing.DWA",
                                                              "init_args": {"temperature": 2.0}},
                         "options": {"trainer.max_epochs": 3}}},
        seeds=2, grid={"model.optimizer.init_args.lr": [0.001, 0.01]}, set={"trainer.max_epochs": 1},
    ))
    runs = expand(grid, [EW], str(tmp_path / "out"))
    names = [r.name for r in runs]
    assert names[:4] == ["ew-lr=0.001-s0", "ew-lr=0.001-s1", "ew-lr=0.01-s0", "ew-lr=0.01-s1"]
    assert len(names) == 16 and len(set(names)) == 16 and names[-1] == "dwa-lr=0.01-s1"
    assert runs[2].group == "ew-lr=0.01" and runs[2].seed == 0 and runs[2].options == {"model.optimizer.init_args.lr": 0.01}
    assert all(r.folder == str(tmp_path / "out" / r.name) for r in runs)
    famo = next(r for r in runs if r.method == "famo")
    assert famo.args[:4] == ["--config", EW, "--config", FAMO]
    dwa = next(r for r in runs if r.method == "dwa")
    args = dict(zip(dwa.args[::2], dwa.args[1::2]))
    assert args["--trainer.max_epochs"] == "3"  # the method's options win over set
    assert json.loads(args["--trainer.callbacks"]) == [
        {"class_path": "mtl_lightning.balancing.DWA", "init_args": {"temperature": 2.0}}]
    uw = next(r for r in runs if r.method == "uw")
    assert "mtl_lightning.balancing.UW" in uw.command()
    loggers = json.loads(dict(zip(uw.args[::2], uw.args[1::2]))["--trainer.logger"])
    assert loggers[0]["init_args"] == {"save_dir": str(tmp_path / "out"), "name": "", "version": uw.name}
    assert loggers[1]["init_args"]["group"] == "demo" and loggers[1]["init_args"]["name"] == uw.name
    assert len(json.loads(dict(zip(uw.args[::2], uw.args[1::2]))["--trainer.logger"])) == 2
    no_wandb = expand(grid, [EW], str(tmp_path / "out"), wandb=False)[0]
    assert len(json.loads(dict(zip(no_wandb.args[::2], no_wandb.args[1::2]))["--trainer.logger"])) == 1


@pytest.mark.parametrize("grid, message", [
    ({"methods": {"x": "missing.yaml"}}, r"methods\.x\.config: config file 'missing\.yaml' not found"),
    ({"methods": {"x": 3}}, r"methods\.x: a method is a config file, a callback class path or a mapping"),
    ({"methods": {"x": {"confg": "a.yaml"}}}, r"methods\.x: unknown key\(s\) \['confg'\]"),
    ({"seeds": [0, "a"]}, r"seeds: expected a list of integers"),
    ({"grid": {"model.lr": 0.1}}, r"grid\.model\.lr: expected a non-empty list"),
    ({"set": {"not a key": 1}}, r"set: 'not a key' is not a dotted option name"),
    ({"method": {}}, r"unknown key\(s\) \['method'\]"),
])
def test_grid_errors_name_the_file_and_key(tmp_path, grid, message):
    path = _grid(tmp_path / "bad.yaml", **grid)
    with pytest.raises(SweepError, match=re.escape(path) + ".*" + message):
        load_grid(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", "--grid", str(tmp_path / "none.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --grid {tmp_path / 'none.yaml'}: No such file")
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--grid", _grid(tmp_path / "g.yaml", seeds=[0])])
    assert "--config: no base config given" in capsys.readouterr().err


@pytest.mark.slow
def test_a_configuration_error_fails_its_run_in_one_line_and_stops_the_sweep(tmp_path, capfd, subprocess_env):
    grid = _grid(tmp_path / "g.yaml", seeds=[0, 1], set={"model.no_such_option": 1}, wandb=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", "--config", EW, "--grid", grid, "--root", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    out = capfd.readouterr().out
    assert re.search(r"1/2 base-s0 failed \(exit 2\) \(\d+ s\): see \S+base-s0/log\.txt", out), out
    assert "2/2 base-s1 not started\n" in out
    log = (tmp_path / "out" / "base-s0" / "log.txt").read_text()
    assert "no_such_option" in log and "Traceback" not in log, log


@pytest.mark.slow
def test_local_sweep_skips_finished_runs_resumes_crashed_ones_and_tabulates(tmp_path, capfd, subprocess_env):
    grid = _grid(tmp_path / "grid.yaml", name="tiny", methods={"ew": {}, "uw": "mtl_lightning.balancing.UW"},
                 seeds=[0, 1], set=TINY)
    root = tmp_path / "out"
    command = ["sweep", "--config", EW, "--grid", grid, "--root", str(root), "--jobs", "2", "--no-wandb"]
    start = time.time()
    cli_main(command)
    out = capfd.readouterr().out
    names = ["ew-s0", "ew-s1", "uw-s0", "uw-s1"]
    for name in names:
        assert re.search(rf"\d/4 {name} done", out), out
        assert (root / name / "results.json").is_file() and (root / name / "metrics.csv").is_file()
    mtimes = {n: (root / n / "results.json").stat().st_mtime for n in names}

    cli_main(command)  # everything finished: nothing runs
    out = capfd.readouterr().out
    assert "4 finished run(s) skipped" in out and " done " not in out
    assert {n: (root / n / "results.json").stat().st_mtime for n in names} == mtimes

    # A run that crashed after its last checkpoint (no results file) runs again from that checkpoint.
    crashed = root / "uw-s1"
    first = json.loads((crashed / "results.json").read_text())
    checkpoint = latest_checkpoint(str(crashed))
    assert checkpoint and "epoch=1" in checkpoint
    (crashed / "results.json").unlink()
    cli_main(command)
    out = capfd.readouterr().out
    assert "3 finished run(s) skipped" in out and re.search(r"1/1 uw-s1 done", out), out
    attempts = (crashed / "attempts.log").read_text().splitlines()
    assert len(attempts) == 2 and attempts[0].endswith("checkpoint=-") and attempts[1].endswith(f"checkpoint={checkpoint}")
    second = json.loads((crashed / "results.json").read_text())
    assert second["global_step"] == first["global_step"] == 4
    assert second["splits"]["test"] == first["splits"]["test"]  # the same final model, tested again

    # The table: mean ± std per method over its seeds, from the runs' own results files.
    cli_main(["results", str(root), "--format", "csv"])
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(capfd.readouterr().out))}
    assert sorted(rows) == ["ew", "uw"]
    for method in ("ew", "uw"):
        records = [json.loads((root / f"{method}-s{s}" / "results.json").read_text()) for s in (0, 1)]
        assert {r["method"] for r in records} == {method} and rows[method]["runs"] == "2"
        for task in ("left", "right"):
            for metric in ("accuracy", "f1"):
                values = [r["splits"]["test"]["metrics"][task][metric] for r in records]
                assert float(rows[method][f"{task}/{metric} ↑ mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
                assert float(rows[method][f"{task}/{metric} ↑ std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert records[0]["tasks"]["left"]["accuracy"] == {"higher_is_better": True, "baseline": None}
    weights = [line for line in open(root / "uw-s0" / "metrics.csv") if line.strip()]
    assert "train/left/weight" in weights[0] and len(weights) > 3
    print(f"local sweep test: {time.time() - start:.0f} s")


@pytest.mark.slow
def test_submitit_job_requeues_on_preemption_and_resumes_its_checkpoint(tmp_path, subprocess_env):
    pytest.importorskip("submitit")
    from submitit.local.local import LocalJobEnvironment

    pause = {"class_path": "sweep_helpers.PauseForPreemption", "init_args": {"step": 2}}
    grid = _grid(tmp_path / "grid.yaml", methods={"ew": {"callback": pause}}, seeds=[3], set=TINY)  # with W&B (offline)
    root = tmp_path / "out"
    runs = expand(load_grid(grid), [EW], str(root))
    prepare(runs)
    (job,) = launch_slurm(runs, str(root), jobs=1, cluster="local", parameters={"timeout_min": 10})
    folder = Path(runs[0].folder)
    deadline = time.time() + 300
    while not (folder / "paused").exists():
        assert time.time() < deadline and job.state not in ("FINISHED", "INTERRUPTED"), job.stderr()
        time.sleep(0.2)
    pid = int((folder / "paused").read_text())
    os.kill(pid, LocalJobEnvironment._usr_sig())  # what SLURM sends before preempting or at the time limit
    assert job.result() == str(folder)
    attempts = (folder / "attempts.log").read_text().splitlines()
    assert len(attempts) == 2 and f"pid={pid}" in attempts[0], attempts
    assert attempts[1].endswith(f"checkpoint={folder / 'checkpoints' / 'preempted.ckpt'}")
    record = json.loads((folder / "results.json").read_text())
    assert record["global_step"] == 4 and record["seed"] == 3  # two epochs of two steps, as without preemption
    assert "Requeued" in (job.stderr() or "") + (job.stdout() or "")
    # Both attempts logged to the same W&B run (its id is fixed by the run folder).
    wandb_runs = sorted(p.name for p in (folder / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({name.rsplit("-", 1)[1] for name in wandb_runs}) == 1, wandb_runs


@pytest.mark.slow
def test_slurm_launcher_from_the_command_line_waits_and_skips_finished_runs(tmp_path, capfd, subprocess_env):
    pytest.importorskip("submitit")
    grid = _grid(tmp_path / "g.yaml", seeds=[5], set=TINY, wandb=False)
    command = ["sweep", "--config", EW, "--grid", grid, "--root", str(tmp_path / "out"), "--launcher", "slurm",
               "--cluster", "local", "--slurm", "timeout_min=10", "--slurm", "cpus_per_task=1"]
    cli_main(command)
    out = capfd.readouterr().out
    job_id = re.search(r"submitted 1 job\(s\): (\S+)", out).group(1)
    assert (tmp_path / "out" / "submitted_jobs.txt").read_text() == f"{job_id} base-s5\n"
    assert json.loads((tmp_path / "out" / "base-s5" / "results.json").read_text())["seed"] == 5
    cli_main(command)
    assert "submitted 0 job(s): -" in capfd.readouterr().out
    with pytest.raises(SystemExit):
        cli_main([*command, "--slurm", "timeout_min"])
    assert "--slurm 'timeout_min': expected KEY=VALUE" in capfd.readouterr().err


def test_slurm_sweep_jobs_are_one_process_each(tmp_path):
    pytest.importorskip("submitit")
    runs = expand(load_grid(_grid(tmp_path / "g.yaml", seeds=[0])), [EW], str(tmp_path / "out"))
    with pytest.raises(SweepError, match=r"--slurm: a sweep runs one process per run .*ddp\.sbatch"):
        launch_slurm(runs, str(tmp_path / "out"), 1, cluster="local", parameters={"tasks_per_node": 2})


def test_wandb_launcher_writes_a_sweep_config_whose_agent_runs_the_same_runs(tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", name="wb", methods={"ew": {}, "famo": FAMO}, seeds=[0, 1, 2],
                 grid={"model.optimizer.init_args.lr": [0.001, 0.002]}, wandb={"project": "mtl-demo"})
    out = tmp_path / "sweep.yaml"
    cli_main(["sweep", "--config", EW, "--grid", grid, "--root", str(tmp_path / "r"), "--launcher", "wandb", "--out", str(out)])
    assert f"wandb sweep {out}" in capsys.readouterr().out
    config = yaml.safe_load(out.read_text())
    assert config["method"] == "grid" and config["name"] == "wb" and config["project"] == "mtl-demo"
    assert config["parameters"] == {"method": {"values": ["ew", "famo"]}, "seed": {"values": [0, 1, 2]},
                                    "model.optimizer.init_args.lr": {"values": [0.001, 0.002]}}
    assert config["command"] == ["${env}", "${interpreter}", "-m", "mtl_lightning", "sweep", "--config", EW,
                                 "--grid", grid, "--root", str(tmp_path / "r"), "--agent", "${args}"]
    # wandb agent appends --key=value for one point of the grid: that point is the local run of that name
    runs = expand(load_grid(grid), [EW], str(tmp_path / "r"))
    run = agent_run(runs, ["--method=famo", "--seed=2", "--model.optimizer.init_args.lr=0.002"])
    assert run.name == "famo-lr=0.002-s2" and run.folder == str(tmp_path / "r" / "famo-lr=0.002-s2")
    with pytest.raises(SweepError, match="no run of the grid matches"):
        agent_run(runs, ["--method=famo", "--seed=7", "--model.optimizer.init_args.lr=0.002"])


def test_shipped_grids_load_and_expand(tmp_path):
    """Every grid under experiments/sweeps/ is valid and names existing configs (its runs are those the
    docs' tables come from)."""
    from mtl_lightning.sweep import expand, load_grid

    grids = sorted((Path(__file__).resolve().parent.parent / "experiments" / "sweeps").glob("*.yaml"))
    assert grids
    for path in grids:
        grid = load_grid(str(path))
        runs = expand(grid, [], str(tmp_path))
        assert runs and len({r.name for r in runs}) == len(runs), path.name
        if path.name == "multidigits.yaml":
            assert len(runs) == 15 and {r.group for r in runs} == {"ew", "uw", "dwa", "gls", "famo"}


def test_the_all_methods_grid_lists_every_registered_method():
    """``multidigits_all.yaml`` (the docs' table of every method) names each registered method once:
    a method added to the library without a row in that table fails here. StaticWeighting is left
    out on purpose (its default, equal weights, is EW)."""
    from mtl_lightning.registry import balancing_methods

    path = Path(__file__).resolve().parent.parent / "experiments" / "sweeps" / "multidigits_all.yaml"
    grid = load_grid(str(path))
    classes = [m["callback"]["class_path"].rsplit(".", 1)[1] for m in grid["methods"].values() if m["callback"]]
    assert len(classes) == len(set(classes))
    assert set(classes) == set(balancing_methods()) - {"EqualWeighting", "StaticWeighting"}
    assert grid["methods"]["ew"] == {"configs": [], "callback": None, "options": {}}
