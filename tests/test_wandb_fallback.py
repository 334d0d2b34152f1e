"""W&B never kills a run: with an API key but no reachable server the logger goes offline within a
bounded time and says, in one line, where the offline run is and how to ``wandb sync`` it. Nothing
here leaves the machine: the "server" is a closed or silent port on 127.0.0.1."""

import glob
import os
import socket
import time
from pathlib import Path

import pytest
import wandb

from mtl_lightning.cli import main
from mtl_lightning.tracking import WandbLogger, server_reachable

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "multidigits" / "ew.yaml")
BOUND_S = 15.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """A fresh W&B session (its settings are read from the environment once per session)."""
    wandb.teardown()
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    yield monkeypatch
    wandb.finish()
    wandb.teardown()


def _fake_key(monkeypatch, port: int) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")


def _offline_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("W&B offline")]
    assert len(lines) == 1, out
    return lines[0]


def test_api_key_and_closed_port_falls_back_offline_quickly(wandb_env, capfd):
    _fake_key(wandb_env, _closed_port())
    logger = WandbLogger(save_dir="runs")
    start = time.monotonic()
    run = logger.experiment
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, elapsed
    assert run.settings.mode in ("offline", "dryrun")
    line = _offline_line(capfd.readouterr().out)
    assert "unreachable" in line and f"wandb sync {logger.offline_dir}" in line
    assert os.path.isdir(logger.offline_dir) and "offline-run-" in logger.offline_dir


def test_api_key_and_silent_server_falls_back_within_the_init_timeout(wandb_env, capfd):
    # A listening socket that never answers: the TCP probe succeeds, wandb.init then times out.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        _fake_key(wandb_env, server.getsockname()[1])
        assert server_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1.0) is None
        logger = WandbLogger(save_dir="runs", init_timeout=3.0)
        start = time.monotonic()
        run = logger.experiment
        elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, elapsed
    assert run.settings.mode in ("offline", "dryrun")
    line = _offline_line(capfd.readouterr().out)
    assert "could not start the online run" in line and f"wandb sync {logger.offline_dir}" in line


def test_without_a_key_goes_offline_and_says_so(wandb_env, capfd):
    logger = WandbLogger(save_dir="runs")
    run = logger.experiment
    assert run.settings.mode in ("offline", "dryrun")
    line = _offline_line(capfd.readouterr().out)
    assert "no API key" in line and f"wandb sync {logger.offline_dir}" in line


def test_fit_with_unreachable_server_completes_offline(wandb_env, capfd):
    _fake_key(wandb_env, _closed_port())
    start = time.monotonic()
    main(["fit", "--config", EW, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--data.init_args.num_train", "256", "--data.init_args.num_val", "64",
          "--data.init_args.num_test", "64", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    assert time.monotonic() - start < 60
    out = capfd.readouterr().out
    line = _offline_line(out)
    offline_dir = line.split("wandb sync ")[-1].strip()
    assert glob.glob(f"{offline_dir}/run-*.wandb")
    assert "Run summary (fit)" in out and f"wandb sync {offline_dir}" in out.split("Run summary")[-1]
