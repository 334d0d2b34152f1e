"""Fault injection: a run killed (SIGKILL) mid-epoch, stopped by SIGTERM / SIGUSR1, given a corrupt or
malicious checkpoint, running out of disk while writing a checkpoint, or meeting a NaN in one task.
Each has its expected outcome, and nothing that was checkpointed is lost: the last checkpoint loads
and resumes (bit for bit equal to the uninterrupted run where that is checked)."""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from fault_helpers import Snapshot
from lightning.pytorch.callbacks import ModelCheckpoint

from mtl_lightning.cli import MTLCLI, TRACEBACK_ENV, main
from mtl_lightning.fault_tolerance import AtomicCheckpointIO, FaultTolerance

pytestmark = pytest.mark.one_thread

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "multidigits" / "ew.yaml")
# 320 training pairs in batches of 32: 10 steps an epoch, so steps 3 and 5 fall inside the first epoch.
TINY = ["--data.init_args.num_train", "320", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
        "--data.init_args.batch_size", "32", "--model.encoder.init_args.out_features", "16",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "-1"]
STEPS, EVERY, PAUSE = 12, 3, 5
DATA_KEY = "MultiDigitsDataModule"  # where Lightning keeps the data module's state (the training position)


def _config(path: Path, root: Path, every: int = EVERY, save_top_k: int = -1, save_last: bool = True,
            extra: tuple[dict, ...] = ()) -> str:
    """A config file: the run's folder, a step-triggered ModelCheckpoint and extra callbacks."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": every, "save_last": save_last, "save_top_k": save_top_k}}, *extra]
    path.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(root), "callbacks": callbacks}}))
    return str(path)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _step_checkpoint(folder: Path, step: int) -> Path:
    found = sorted(folder.glob(f"epoch=*-step={step}.ckpt"))
    assert len(found) == 1, sorted(p.name for p in folder.iterdir())
    return found[0]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_training_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Weights and optimizer state equal bit for bit, and the same training position."""
    assert got["global_step"] == expected["global_step"]
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    differ = [k for k in expected["state_dict"] if not torch.equal(got["state_dict"][k], expected["state_dict"][k])]
    assert not differ, f"weights differ: {differ}"
    assert _equal(got["optimizer_states"], expected["optimizer_states"]), "optimizer states differ"


def _all_finite(checkpoint: dict[str, Any]) -> bool:
    tensors = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
    for opt in checkpoint.get("optimizer_states", []):
        tensors += [v for s in opt["state"].values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------- subprocess runs
def _env() -> dict[str, str]:
    # One intra-op thread, as in this process: small models train faster, and every run computes alike.
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
                WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")


class Run:
    """``python -m mtl_lightning fit`` in a subprocess (output in files: nothing blocks on a pipe)."""

    def __init__(self, cwd: Path, name: str, args: list[str]) -> None:
        self.out, self.err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "mtl_lightning", "fit", "--config", EW, *TINY, *args],
                                         cwd=cwd, env=_env(), stdout=out, stderr=err)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (status {self.proc.returncode}) before it was interrupted:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for the run:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not end:\n{self.output()[-3000:]}")


def _fit(cwd: Path, name: str, config: str, *args: str) -> Run:
    return Run(cwd, name, ["--config", config, "--trainer.max_steps", str(STEPS), *args])


def _pause(marker: Path) -> dict:
    return {"class_path": "fault_helpers.PauseAtStep", "init_args": {"step": PAUSE, "marker": str(marker)}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, dict[str, Any]]:
    """The uninterrupted run: its checkpoint after every step, by step."""
    folder = tmp_path_factory.mktemp("straight")
    run = _fit(folder, "straight", _config(folder / "straight.yaml", folder / "run", every=1, save_last=False))
    assert run.wait() == 0, run.output()[-3000:]
    return {step: _load(_step_checkpoint(folder / "run" / "checkpoints", step)) for step in (3, PAUSE, STEPS)}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(straight, tmp_path):
    ckpts, marker = tmp_path / "run" / "checkpoints", tmp_path / "paused"
    config = _config(tmp_path / "killed.yaml", tmp_path / "run", extra=(_pause(marker),))
    run = _fit(tmp_path, "killed", config)
    run.wait_for(lambda: (ckpts / "last.ckpt").exists() and marker.exists())  # step 3 saved, step 5 done
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL

    last = _load(ckpts / "last.ckpt")  # what SIGKILL could not take away
    assert last["global_step"] == 3 and last["epoch"] == 0 and last[DATA_KEY] == {"epoch": 0, "position": 3 * 32}
    _assert_same_training_state(last, straight[3])
    assert not list(ckpts.glob(".*.tmp")), "no partial checkpoint"

    resumed = _fit(tmp_path, "resumed", _config(tmp_path / "resume.yaml", tmp_path / "run"), "--ckpt_path", str(ckpts / "last.ckpt"))
    assert resumed.wait() == 0, resumed.output()[-3000:]
    _assert_same_training_state(_load(_step_checkpoint(ckpts, STEPS)), straight[STEPS])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_a_resumable_checkpoint_after_the_current_step(name, straight, tmp_path):
    signum = int(getattr(signal, name))
    ckpts, marker = tmp_path / "run" / "checkpoints", tmp_path / "paused"
    run = _fit(tmp_path, "stopped", _config(tmp_path / "stopped.yaml", tmp_path / "run", extra=(_pause(marker),)))
    run.wait_for(marker.exists)  # paused after step 5; the last periodic checkpoint is step 3's
    os.kill(run.proc.pid, signum)
    status = run.wait()
    output = run.output()
    assert status == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]

    stop = Path("run", "checkpoints", f"last-stopped-step={PAUSE}.ckpt")
    lines = [line for line in run.err.read_text().splitlines() if line.startswith("Stopped by")]
    assert lines == [f"Stopped by {name} after step {PAUSE} (epoch 0): resumable checkpoint {stop}; "
                     f"resume with: mtl-lightning fit <the same options> --ckpt_path {stop}"], output[-3000:]
    last = ModelCheckpoint(dirpath=str(ckpts))._find_last_checkpoints(None)  # what --ckpt_path last picks from
    assert max(last, key=os.path.getmtime) == str(tmp_path / stop)
    checkpoint = _load(tmp_path / stop)  # steps 4 and 5, done after the last periodic checkpoint, are in it
    assert checkpoint[DATA_KEY] == {"epoch": 0, "position": PAUSE * 32}
    _assert_same_training_state(checkpoint, straight[PAUSE])
    if name == "SIGUSR1":
        return  # the same checkpoint as SIGTERM's, written by the same code: its resume is checked there

    resumed = _fit(tmp_path, "resumed", _config(tmp_path / "resume.yaml", tmp_path / "run"), "--ckpt_path", str(stop))
    assert resumed.wait() == 0, resumed.output()[-3000:]
    _assert_same_training_state(_load(_step_checkpoint(ckpts, STEPS)), straight[STEPS])


# ---------------------------------------------------------------------------------------- in-process runs
def _cli(*args: str) -> MTLCLI:
    return MTLCLI(args=["--config", EW, *TINY, *args], run=False)


def _weights(cli: MTLCLI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def test_a_stop_signal_waits_for_the_end_of_an_accumulated_step(tmp_path):
    """With 2 micro-batches a step, SIGTERM during the first of them stops after the second: the
    checkpoint holds no half-accumulated step, and resuming from it equals the uninterrupted run."""
    accumulate = ["--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "8", "--trainer.enable_checkpointing", "false"]
    straight = _cli(*accumulate)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    signal_config = tmp_path / "signal.yaml"  # batch 4 is the first micro-batch of step 3
    signal_config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "fault_helpers.SignalAtBatch", "init_args": {"batch_idx": 4}}]}}))
    stopped = _cli(*accumulate, "--config", str(signal_config))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stop:
        stopped.trainer.fit(stopped.model, datamodule=stopped.datamodule)
    assert stop.value.code == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers  # restored
    ft = next(cb for cb in stopped.trainer.callbacks if isinstance(cb, FaultTolerance))
    checkpoint = _load(Path(ft.stop_checkpoint))
    assert checkpoint["global_step"] == 3 and checkpoint[DATA_KEY] == {"epoch": 0, "position": 6 * 32}

    resumed = _cli(*accumulate)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=ft.stop_checkpoint)
    assert resumed.trainer.global_step == 8
    expected, got = _weights(straight), _weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_slurm_auto_requeue_keeps_lightnings_sigusr1_handling(tmp_path, monkeypatch):
    """Under SLURM, SIGUSR1 stays Lightning's auto-requeue: an HPC checkpoint and ``scontrol requeue``
    (a stand-in here), and the run goes on (SLURM's SIGTERM stops it later)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "fault-test", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    signal_config = tmp_path / "signal.yaml"
    signal_config.write_text(yaml.safe_dump({"trainer": {"default_root_dir": str(tmp_path), "callbacks": [
        {"class_path": "fault_helpers.SignalAtBatch", "init_args": {"batch_idx": 2, "signum": int(signal.SIGUSR1)}}]}}))
    cli = _cli("--trainer.max_steps", "4", "--trainer.enable_checkpointing", "false", "--config", str(signal_config))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ft = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FaultTolerance))
    assert cli.trainer.global_step == 4 and ft.signal_name is None and ft.stop_checkpoint is None
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert _load(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 3


# ------------------------------------------------------------------ corrupt and malicious checkpoints
class _Payload:
    """Unpickling it would create a file (the proof that code in a checkpoint ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoint(kind: str, folder: Path) -> tuple[Path, Path]:
    """(the file, the marker that unpickling it would create)."""
    marker, path = folder / "code-ran", folder / f"{kind}.ckpt"
    buffer = io.BytesIO()
    torch.save({"state_dict": {"encoder.weight": torch.randn(64, 64)}, "global_step": 1}, buffer)
    good = buffer.getvalue()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "crafted-torch":  # torch.save's format with a payload in its pickle
        torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    elif kind == "crafted-pickle":  # a plain pickle
        path.write_bytes(pickle.dumps({"state_dict": {}, "payload": _Payload(marker)}, protocol=2))
    return path, marker


@pytest.mark.parametrize("option", ["--ckpt_path", "--model.init_from"])
@pytest.mark.parametrize("kind", ["truncated", "random-bytes", "empty", "crafted-torch", "crafted-pickle"])
def test_an_unreadable_checkpoint_is_one_message_naming_the_file_before_training(kind, option, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    path, marker = _bad_checkpoint(kind, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", EW, *TINY, "--trainer.max_steps", "2", option, str(path)])
    out, err = capfd.readouterr()
    assert exit_.value.code == 2
    assert not marker.exists(), "code in the checkpoint ran"
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("tip:"), err
    assert lines[0].startswith(f"error in {option}: ") and f"{path.name}'" in lines[0], lines[0]
    reason = "not unpickled (checkpoints are read with weights_only=True" if kind.startswith("crafted") else "corrupt"
    assert reason in lines[0], lines[0]
    assert "Run summary" not in out and not (tmp_path / "checkpoints").exists()  # nothing trained


def test_unreadable_checkpoint_from_python_names_the_file(tmp_path):
    """Outside the console script: the Trainer's checkpoint reader and ``load_pretrained``."""
    path, marker = _bad_checkpoint("crafted-torch", tmp_path)
    cli = _cli("--trainer.max_steps", "1")
    with pytest.raises(ValueError, match=rf"cannot read checkpoint '.*{path.name}'.*not unpickled"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(path))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    truncated, _ = _bad_checkpoint("truncated", tmp_path)
    with pytest.raises(ValueError, match=rf"init_from: checkpoint '.*{truncated.name}' is corrupt: the file is truncated"):
        cli.model.load_pretrained(str(truncated))
    assert not marker.exists()


# ------------------------------------------------------------------ a full disk
_REAL_SAVE = torch.save


def _full_disk_from_step(monkeypatch, step: int) -> None:
    """From ``step`` on, writing a checkpoint into a file writes half of it, then the disk is full."""
    real_save = _REAL_SAVE

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("global_step", -1) >= step:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            if hasattr(f, "write"):
                f.write(data[: len(data) // 2])
            else:
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_fails_the_run_clearly_and_keeps_the_last_checkpoint(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    Snapshot.SNAPSHOTS.clear()
    snapshot = {"class_path": "fault_helpers.Snapshot"}
    config = _config(tmp_path / "full.yaml", tmp_path, save_top_k=0, extra=(snapshot,))  # last.ckpt only, every 3 steps
    _full_disk_from_step(monkeypatch, 6)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", EW, *TINY, "--config", config, "--trainer.max_steps", str(STEPS)])
    err = capfd.readouterr().err
    assert exit_.value.code == 1
    message = err.strip().splitlines()
    assert len(message) == 2 and "Traceback" not in err, err
    last = os.path.join("checkpoints", "last.ckpt")
    assert message[0].startswith(f"error: Writing checkpoint {last} failed: No space left on device (folder checkpoints)"), err
    assert f"intact (the last one: {last}, step 3)" in message[0], err

    checkpoint = _load(tmp_path / last)  # the step-6 write did not touch it
    assert checkpoint["global_step"] == 3
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in Snapshot.SNAPSHOTS[3].items())
    assert not list((tmp_path / "checkpoints").glob(".*")), "the partial temporary file is removed"

    monkeypatch.setattr(torch, "save", _REAL_SAVE)  # space again (undo() would also undo the fixture's chdir)
    main(["fit", "--config", EW, *TINY, "--config", config, "--trainer.max_steps", str(STEPS), "--ckpt_path", last])
    resumed = _load(tmp_path / last)
    assert resumed["global_step"] == STEPS and _all_finite(resumed)


# ------------------------------------------------------------------ NaN in one task
def test_a_nan_loss_in_one_task_stops_the_run_naming_task_and_step(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    dump = tmp_path / "weights-at-failure.pt"
    nan = {"class_path": "fault_helpers.NaNLoss", "init_args": {"task": "right", "step": 7, "dump": str(dump)}}
    config = _config(tmp_path / "nan.yaml", tmp_path, extra=(nan,))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", EW, *TINY, "--config", config, "--trainer.max_steps", str(STEPS)])
    err = capfd.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    assert err.startswith("error: Non-finite loss for task(s) ['right'] at train step 7 (values: {right: nan})"), err
    last = os.path.join("checkpoints", "last.ckpt")
    assert f"The last checkpoint: {last} (step 6); resume with --ckpt_path {last}" in err, err

    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert all(_all_finite(_load(p)) for p in ckpts.iterdir())
    weights = torch.load(dump, weights_only=True)  # the failing step was not applied
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
    assert _load(ckpts / "last.ckpt")["global_step"] == 6

    main(["fit", "--config", EW, *TINY, "--config", _config(tmp_path / "resume.yaml", tmp_path),
          "--trainer.max_steps", str(STEPS), "--ckpt_path", last])
    resumed = _load(_step_checkpoint(ckpts, STEPS))
    assert resumed["global_step"] == STEPS and _all_finite(resumed)


def test_non_finite_weights_are_never_written_into_a_checkpoint(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    nan = {"class_path": "fault_helpers.NaNWeights", "init_args": {"task": "left", "step": 6}}
    config = _config(tmp_path / "nan.yaml", tmp_path, extra=(nan,))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", EW, *TINY, "--config", config, "--trainer.max_steps", str(STEPS)])
    err = capfd.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    assert err.startswith("error: Refusing to write checkpoint checkpoints/epoch=0-step=6.ckpt: 'heads.left."), err
    assert "holds NaN or infinite values (step 6)" in err and "the last one: checkpoints/last.ckpt, step 3" in err, err
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert _load(ckpts / "last.ckpt")["global_step"] == 3 and _all_finite(_load(ckpts / "last.ckpt"))
