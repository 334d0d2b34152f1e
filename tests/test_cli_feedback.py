"""What the CLI tells the user: a run summary at the end, the config saved in each run's own folder,
configuration errors as one short message that names the option, abbreviated options rejected,
no advertisement tips, and the shipped scheduled config runs from the console script."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
import yaml

from mtl_lightning.cli import TRACEBACK_ENV, main
from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.summary import format_summary

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "multidigits" / "ew.yaml")
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--data.init_args.num_train", "256", "--data.init_args.num_val", "64", "--data.init_args.num_test", "64",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]
TIP = re.compile(r"💡|litlogger|litmodels|LitServe", re.IGNORECASE)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv(TRACEBACK_ENV, "0")  # restored (unset) afterwards, also after --debug
    yield
    wandb.finish()


def _summary(out: str) -> str:
    assert "Run summary (fit)" in out, out
    return out.split("Run summary (fit)")[-1]


def test_fit_prints_summary_and_each_run_keeps_its_own_config(capfd):
    folders = []
    for lr in ("0.002", "0.001"):
        main(["fit", "--config", EW, *TINY, "--model.optimizer.init_args.lr", lr])
        out, err = capfd.readouterr()
        summary = _summary(out)
        for task in ("left", "right"):
            assert re.search(rf"val/{task}\s+accuracy \d", summary), summary
        folder = re.search(r"run folder\s+(\S+)", summary).group(1)
        config = re.search(r"\(config: (\S+)\)", summary).group(1)
        checkpoint = re.search(r"checkpoint\s+best: (\S+\.ckpt)", summary).group(1)
        assert re.search(r"W&B\s+offline, \S+offline-run-\S+ \(upload: wandb sync ", summary)
        assert config == os.path.join(folder, "config.yaml") and os.path.isfile(checkpoint)
        assert checkpoint.startswith(folder)
        assert yaml.safe_load(open(config))["model"]["optimizer"]["init_args"]["lr"] == float(lr)
        assert not TIP.search(out + err), [line for line in (out + err).splitlines() if TIP.search(line)]
        folders.append(folder)
    assert folders[0] != folders[1]
    assert not os.path.exists("runs/config.yaml")
    # The first run's config is intact after the second run.
    assert yaml.safe_load(open(os.path.join(folders[0], "config.yaml")))["model"]["optimizer"]["init_args"]["lr"] == 0.002


def test_a_run_resumed_into_the_same_folder_does_not_overwrite_its_config(capfd):
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
           "--trainer.logger.version", "0", "--trainer.limit_val_batches", "0"]
    main(["fit", "--config", EW, *TINY, *csv])
    first = _summary(capfd.readouterr().out)
    main(["fit", "--config", EW, *TINY, *csv, "--trainer.max_epochs", "2"])
    second = _summary(capfd.readouterr().out)
    folder = re.search(r"run folder\s+(\S+)", first).group(1)
    assert re.search(r"run folder\s+(\S+)", second).group(1) == folder and "version_0" in folder
    assert yaml.safe_load(open(os.path.join(folder, "config.yaml")))["trainer"]["max_epochs"] == 1
    assert yaml.safe_load(open(os.path.join(folder, "config-2.yaml")))["trainer"]["max_epochs"] == 2
    assert re.search(r"train/left\s+loss\w* \d", second), second  # no validation: the train metrics
    assert f"config: {os.path.join(folder, 'config-2.yaml')}" in second
    checkpoint = re.search(r"best: (\S+\.ckpt)", second).group(1)
    main(["test", "--config", EW, *TINY, *csv, "--ckpt_path", checkpoint])
    tested = capfd.readouterr().out.split("Run summary (test)")[-1]
    assert re.search(r"test/right\s+accuracy \d", tested) and f"loaded: {checkpoint}" in tested, tested


def test_summary_shows_delta_where_tasks_have_baselines():
    metrics = {"val/a/accuracy": 0.9, "val/a/loss": 0.3, "val/a/delta": 2.5, "val/b/mse": 0.1,
               "val/delta_m": -1.25, "val/delta_mtl": 1.25, "train/a/weight": 1.0}
    text = format_summary("fit", metrics, ["a", "b"], run_dir="runs/x", checkpoints={"best": "runs/x/c.ckpt"})
    assert "Δm -1.25 %" in text and "Δ_MTL +1.25 %" in text and "Δ +2.50 %" in text
    assert "val/b" in text and "weight" not in text and "runs/x/c.ckpt" in text


@pytest.mark.parametrize(
    "args, names",
    [
        (["--data.init_args.batch_size", "0"], ["--data", "batch_size"]),
        (["--trainer.callbacks+=mtl_lightning.gradients.CAGrad", "--trainer.callbacks.c", "-1"],
         ["--trainer.callbacks", "CAGrad", "c must be >= 0"]),
        (["--trainer.callbacks+=mtl_lightning.monitoring.NegativeTransferMonitor", "--trainer.callbacks.action", "bogus"],
         ["--trainer.callbacks", "NegativeTransferMonitor", "action", "bogus"]),
        (["--trainer.max_epoch", "3"], ["unrecognized arguments", "--trainer.max_epoch"]),
        (["--trainer.max_epochs", "three"], ["trainer.max_epochs"]),
    ],
    ids=["batch_size_0", "cagrad_c_negative", "monitor_action", "abbreviated_option", "bad_type"],
)
def test_bad_arguments_give_one_short_message_naming_the_option(capfd, args, names):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", EW, *args])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    error_lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(error_lines) == 1, err
    for name in names:
        assert name in err, err
    assert len(err.strip().splitlines()) <= 12, err  # not 60+ lines of usage or traceback
    assert not os.path.exists("runs/mtl-lightning")  # nothing ran


def test_debug_flag_gives_the_traceback():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        main(["fit", "--config", EW, "--data.init_args.batch_size", "0", "--debug"])


def test_importing_main_module_does_not_run_the_cli():
    sys.modules.pop("mtl_lightning.__main__", None)
    module = importlib.import_module("mtl_lightning.__main__")
    assert callable(module.main)


def test_console_script_runs_the_scheduled_config_clean(tmp_path):
    script = Path(sys.executable).with_name("mtl-lightning")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", TRACEBACK_ENV)}
    env.update(WANDB_MODE="offline", PYTHONWARNINGS="default::DeprecationWarning,default::FutureWarning")
    result = subprocess.run(
        [str(script), "fit", "--config", str(ROOT / "experiments" / "domain_digits" / "scheduled.yaml"),
         "--trainer.max_epochs", "1", "--data.init_args.steps_per_epoch", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Run summary (fit)" in result.stdout and "val/original" in result.stdout
    assert not TIP.search(output), output
    ours = [line for line in output.splitlines() if re.search(r"mtl_lightning/[\w/]+\.py:\d+", line)]
    assert not ours, ours  # no warning raised from our code


class FailingSetupDigits(MultiDigitsDataModule):
    """Stands in for a data check at set-up (e.g. a task without a labelled training sample)."""

    def setup(self, stage=None):
        raise ValueError("Task 'right': no labelled training sample in the training split.")


def test_a_value_error_at_set_up_is_one_message(capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", EW, *TINY, "--data", f"{__name__}.FailingSetupDigits"])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "error during set-up: Task 'right': no labelled" in err, err
