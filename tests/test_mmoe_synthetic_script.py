"""experiments/architectures/mmoe_synthetic.py: the MMoE synthetic-data benchmark (Ma et al., KDD 2018, §4)."""

from __future__ import annotations

import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from experiments.architectures import mmoe_synthetic

    return mmoe_synthetic


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--num-train", "-5"], "--num-train must be >= 1"),
    (["--correlations", "0.5", "1.5"], "--correlations must lie in [-1, 1]"),
    (["--correlations", "0.5", "0.5"], "--correlations has repeated values"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--models", "mmoe", "moe"], "invalid choice: 'moe'"),
])
def test_bad_options_are_rejected_with_a_message(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_models_follow_the_paper_and_have_comparable_sizes(script):
    from mtl_lightning.architectures import MMoE

    counts = {m: script.parameter_count(script.build_module(m, 1e-3)) for m in script.MODELS}
    # d = 100: 8 experts 100→16, gates 100→8, towers 16→8→1 (shared-bottom: 100→113, towers 113→8→1).
    assert counts == {"shared_bottom": 13255, "omoe": 14026, "mmoe": 14834}
    omoe, mmoe = script.build_encoder("omoe"), script.build_encoder("mmoe")
    assert isinstance(omoe, MMoE) and omoe.num_gates == 1 and mmoe.num_gates == "per_task"


@pytest.mark.slow
def test_quick_run_writes_every_result(script, tmp_path, capsys):
    out = tmp_path / "out"
    results = script.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| Shared-Bottom | 13,255 |" in printed and "| MMoE | 14,834 |" in printed
    assert (out / "mmoe_synthetic.png").stat().st_size > 0
    assert "test MSE" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == results["summary"]
    cfg = saved["config"]
    keys = {(r["model"], r["correlation"], r["seed"]) for r in saved["runs"]}
    expected = {(m, p, s) for m in script.MODELS for p in cfg["correlations"] for s in range(cfg["seeds"])}
    assert keys == expected and len(saved["runs"]) == len(expected)
    for r in saved["runs"]:
        numbers = [r["test_mse"], r["train_loss"], *r["test_mse_per_task"].values(), *r["train_loss_curve"]]
        assert len(r["train_loss_curve"]) == cfg["epochs"]
        assert all(math.isfinite(v) and v > 0 for v in numbers)
    assert len(saved["summary"]) == len(script.MODELS) * len(cfg["correlations"])
    for row in saved["summary"]:
        assert all(math.isfinite(row[k]) for k in ("test_mse_mean", "test_mse_std", "train_loss_mean", "train_loss_std"))


@pytest.mark.slow
def test_a_run_is_deterministic_given_its_seed(script):
    args = dict(model="mmoe", correlation=0.5, seed=3, epochs=1, num_train=256, num_test=100, lr=1e-3, batch_size=128)
    first, second = script.run_one(**args), script.run_one(**args)
    assert first["test_mse"] == second["test_mse"] and first["train_loss_curve"] == second["train_loss_curve"]
