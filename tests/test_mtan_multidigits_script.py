"""experiments/architectures/mtan_multidigits.py (MTAN vs hard sharing) and its CLI config."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EW = os.path.join(REPO, "experiments", "multidigits", "ew.yaml")
MTAN_YAML = os.path.join(REPO, "experiments", "architectures", "mtan_multidigits.yaml")


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from experiments.architectures import mtan_multidigits

    return mtan_multidigits


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--num-train", "100", "50", "--epochs", "1", "2", "3"], "one value or one per --num-train"),
    (["--num-train", "0"], "--num-train values must be >= 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_bad_options_are_rejected_with_a_message(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_mtan_trunk_is_smallcnn_with_the_same_initial_weights(script):
    torch.manual_seed(0)
    hard = script.build_module("hard", (4, 8), 16, 1e-3)
    torch.manual_seed(0)
    mtan = script.build_module("mtan", (4, 8), 16, 1e-3)
    trunk = [*mtan.encoder.stages.parameters(), *mtan.encoder.tail.parameters()]
    assert len(trunk) == len(list(hard.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(hard.encoder.parameters(), trunk))
    counts = script.parameter_counts(mtan)
    assert counts["trunk"] == script.parameter_counts(hard)["trunk"]
    assert counts["attention"] > 0 and counts["inter_stage"] > 0


@pytest.mark.slow
def test_quick_run_writes_every_model_and_seed(script, tmp_path):
    out = tmp_path / "out"
    script.main(["--quick", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    expected = {(m, s, n) for m in script.MODELS for s in config["seeds"] for n in config["num_train"]}
    assert {(r["model"], r["seed"], r["num_train"]) for r in results["runs"]} == expected
    for r in results["runs"]:
        assert set(r["test"]) == {"left", "right", "mean"}
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r["test"].values())
    assert len(results["summary"]) == len(script.MODELS) * len(config["num_train"])
    assert results["parameters"]["mtan"]["total"] > results["parameters"]["hard"]["total"]
    assert "| mtan |" in results["table"]


@pytest.mark.slow
def test_yaml_selects_the_mtan_and_trains(script, tmp_path):
    from mtl_lightning.architectures import MTAN
    from mtl_lightning.cli import MTLCLI

    cli = MTLCLI(args=[
        "fit", "--config", EW, "--config", MTAN_YAML, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.init_args.num_train=256", "--data.init_args.num_val=64",
        "--data.init_args.num_test=64", "--data.init_args.batch_size=32",
    ])
    assert isinstance(cli.model.encoder, MTAN)
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["val/left/accuracy"]))
    # The config's MTAN is the script's build_mtan at ew.yaml's SmallCNN size.
    reference = script.build_module("mtan", (32, 64), 128, 1e-3)
    assert script.parameter_counts(cli.model) == script.parameter_counts(reference)
