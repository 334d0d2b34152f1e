"""The pretrained-scale benchmark: every configuration row with finite numbers on the tiny preset, TorchJD's
steps computing the update ours computes, the autogram engine's hooks gone after its step, the target labels."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchjd.autogram")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from experiments.benchmarks import pretrained_scale

    return pretrained_scale


@pytest.fixture
def folder(benchmark, tmp_path):
    benchmark.save_model("tiny", 8, str(tmp_path))
    return str(tmp_path)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_tiny_preset_gives_every_configuration_row(benchmark, folder, one_thread):
    rows = [row for group in benchmark.GROUPS
            for row in benchmark.run_group(folder, 2, group, "UPGrad", batch_size=2, seq_len=8, repeats=1,
                                           device="cpu", inner=1, threads=1)]
    keys = {(r["group"], r["method"], r["mode"]) for r in rows}
    common = {("floor", "-"), ("EW", "-"), ("UPGrad", "param/looped"), ("UPGrad", "torchjd autojac"),
              ("UPGrad", "torchjd autojac-gramian")}
    full = {("UPGrad", "param/batched"), ("UPGrad", "param/gramian"), ("UPGrad", "rep"),
            ("UPGrad", "torchjd autogram")}
    assert keys == {("all", *k) for k in common | full} | {("lora", *k) for k in common}
    for r in rows:
        for column in ("ms", "x_floor", "x_ew", "mem_mb", "mem_x_floor", "mem_x_ew"):
            assert math.isfinite(r[column]) and r[column] >= 0, (r["group"], r["mode"], column)
        assert r["ms"] > 0
        if r["method"] == "UPGrad" and not r["mode"].startswith("torchjd"):
            assert math.isfinite(r["x_torchjd"]) and r["x_torchjd"] > 0 and math.isfinite(r["mem_x_torchjd"])
    for group in benchmark.GROUPS:
        best = [r["torchjd_best"] for r in rows if r["group"] == group and r["mode"].startswith("torchjd")]
        assert sorted(part for b in best for part in b.split(", ") if part) == ["memory", "time"]
    # All the backbone's parameters against the shared adapter's: r·(in + out) on query and value of 2 layers.
    shared = {r["group"]: r["shared_params"] for r in rows}
    assert shared["lora"] == 2 * 2 * 8 * (128 + 128)
    assert shared["all"] > 100 * shared["lora"]
    lines = benchmark.table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.parametrize("group", ["all", "lora"])
def test_torchjds_steps_make_the_update_ours_makes(benchmark, folder, group, one_thread):
    # Same start, one step each: the shared parameters move the same way under our UPGrad and under each
    # TorchJD engine (UPGrad's weights solve the same dual problem; its default tolerances match ours).
    torch.set_num_threads(1)
    module, batch = benchmark.build(folder, group, 2, 2, 8, "cpu")
    start = copy.deepcopy(module.state_dict())
    ours_cls = benchmark.METHODS["UPGrad"]
    equivalent = benchmark.torchjd_equivalents()["UPGrad"]
    benchmark.make_step(module, batch, ours_cls(mode="param"))()
    expected = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    moved = {n for n in expected if not torch.equal(expected[n], start[n])}
    assert moved, "the step moved nothing"
    if group == "all":
        steps = benchmark.make_torchjd_steps(module, batch, "UPGrad", equivalent)
        steps["autogram"] = benchmark.make_autogram_step(module, batch, equivalent(ours_cls(mode="param"), 2))
        # our Gramian engine too (its word-embedding part from the lookups), the heads included
        gramian_engine = ours_cls(mode="param", engine="gramian")
        steps["ours, engine=gramian"] = benchmark.make_step(module, batch, gramian_engine)
    else:
        steps = benchmark.make_torchjd_backward_steps(module, batch, equivalent(ours_cls(mode="param"), 2),
                                                      equivalent(ours_cls(mode="param"), 2))
    assert len(steps) == (4 if group == "all" else 2)
    ids = {id(p) for p in module.shared_parameters()}
    shared = {n for n, p in module.named_parameters() if id(p) in ids}
    for mode, step in steps.items():
        module.load_state_dict(start)
        step()
        for name, p in module.named_parameters():
            if not p.requires_grad or (mode == "autogram" and name not in shared):
                continue  # autogram's heads get wᵢ·∇ (losses.backward(weights)), not their own gradient
            torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
    if group == "all":
        assert any(m._forward_hooks for m in module.modules()), "the Gramian engine records no embedding lookup"
        gramian_engine.teardown(module.trainer, module, "fit")  # removes its lookup hooks
    assert not any(m._forward_hooks for m in module.modules()), "an engine left hooks behind"


def test_target_labels(benchmark):
    base = {"T": 4, "group": "all", "shared_params": 1e6, "ms": 10.0, "x_ew": 2.0, "mem_mb": 5.0,
            "mem_x_floor": 1.0, "mem_x_ew": 3.0}
    met = {**base, "method": "UPGrad", "mode": "param/batched", "x_floor": 1.1, "x_torchjd": 0.7, "mem_x_torchjd": 0.5}
    missed = {**met, "x_floor": 1.2, "x_torchjd": 0.9, "mem_x_torchjd": 0.8}
    rep = {**base, "method": "UPGrad", "mode": "rep", "x_floor": 0.5, "x_ew": 1.4, "x_torchjd": 0.3,
           "mem_x_torchjd": 0.9}
    theirs = {**base, "method": "UPGrad", "mode": "torchjd autogram", "x_floor": 2.0, "torchjd_best": "memory"}
    assert benchmark.target(met) == "≤1.15× floor ok; time ≤0.8× TorchJD ok; mem ≤0.8× TorchJD ok"
    assert benchmark.target(missed) == "≤1.15× floor MISSED; time ≤0.8× TorchJD MISSED; mem ≤0.8× TorchJD ok"
    assert benchmark.target(rep) == "≤1.3× EW MISSED; time ≤0.8× TorchJD ok; mem ≤0.8× TorchJD MISSED"
    assert benchmark.target(theirs) == "TorchJD best (memory)"
    assert benchmark.target({**base, "method": "floor", "mode": "-", "x_floor": 1.0}) == ""


def test_bad_options_are_clear_errors(benchmark):
    with pytest.raises(ValueError, match="size must be one of"):
        benchmark.run([2], size="huge")
    with pytest.raises(ValueError, match="method must be a registered gradient method with a param mode"):
        benchmark.run([2], size="tiny", method="NoSuchMethod")
