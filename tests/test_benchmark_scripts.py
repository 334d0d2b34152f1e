"""The gradient-method benchmark's measurement logic: the bracketed ratio, the rows, the target labels."""

from __future__ import annotations

import math
import os
import statistics
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    from experiments.benchmarks import gradient_methods

    return gradient_methods


def test_bracketed_ratio_cancels_a_drifting_reference(benchmark):
    # The machine's speed jumps around: the reference takes 10, 16, 11, 20 ms in turn; each sample
    # took 1.2x the reference of its moment (the mean of the two bracketing it).
    reference = [10.0, 16.0, 11.0, 20.0]
    samples = [1.2 * (b + a) / 2 for b, a in zip(reference, reference[1:])]
    assert benchmark.bracketed_ratio(samples, reference[:-1], reference[1:]) == pytest.approx(1.2)


def test_bracketed_ratio_is_the_median_over_rounds(benchmark):
    # One round disturbed (the sample caught a 3x hiccup): the median ignores it.
    before, after = [10.0, 10.0, 10.0], [10.0, 10.0, 10.0]
    assert benchmark.bracketed_ratio([11.0, 33.0, 11.5], before, after) == pytest.approx(1.15)


def test_the_torchjd_ratio_cancels_drift_between_the_two_configurations(benchmark):
    # Ours takes 0.8x TorchJD's time in both rounds, but in round 2 the machine ran 1.5x slower while
    # TorchJD's step and the floor samples around it were timed: each configuration's own bracketing
    # floor samples absorb that, where the ratio of the median times would not.
    ours = benchmark.bracketed_ratios([8.0, 8.0], [10.0, 10.0], [10.0, 10.0])
    theirs = benchmark.bracketed_ratios([10.0, 15.0], [10.0, 15.0], [10.0, 15.0])
    assert benchmark.paired_ratio(ours, theirs) == pytest.approx(0.8)
    assert 8.0 / statistics.median([10.0, 15.0]) == pytest.approx(0.64)


def test_table_labels_each_target(benchmark):
    rows = [
        {"T": 8, "method": "MGDA", "mode": "param/batched", "ms": 40.0, "x_ew": 4.0, "x_floor": 1.10, "mem_x_ew": 8.0},
        {"T": 8, "method": "CAGrad", "mode": "param/batched", "ms": 48.0, "x_ew": 4.8, "x_floor": 1.20, "mem_x_ew": 8.0},
        {"T": 8, "method": "CAGrad", "mode": "param/looped", "ms": 60.0, "x_ew": 6.0, "x_floor": 1.50, "mem_x_ew": 15.0},
        {"T": 8, "method": "MGDA", "mode": "rep", "ms": 9.0, "x_ew": 1.25, "x_floor": None, "mem_x_ew": 1.8},
        {"T": 8, "method": "CAGrad", "mode": "rep", "ms": 10.0, "x_ew": 1.35, "x_floor": None, "mem_x_ew": 1.8},
    ]
    lines = benchmark.table(rows).splitlines()[2:]
    assert "ok (≤1.15× floor)" in lines[0]
    assert "MISSED (>1.15× floor)" in lines[1]
    assert "no target" in lines[2]
    assert "ok (≤1.3× EW)" in lines[3]
    assert "MISSED (>1.3× EW)" in lines[4]


def test_table_shows_the_torchjd_columns(benchmark):
    rows = [
        {"T": 4, "method": "UPGrad", "mode": "param/batched", "ms": 20.0, "x_ew": 2.0, "x_floor": 1.0, "mem_x_ew": 4.5,
         "x_torchjd": 0.8, "mem_x_torchjd": 1.6},
        {"T": 4, "method": "UPGrad", "mode": "param/torchjd", "ms": 26.0, "x_ew": 2.6, "x_floor": 1.3, "mem_x_ew": 6.0,
         "torchjd_reference": False},
        {"T": 4, "method": "UPGrad", "mode": "param/torchjd-gramian", "ms": 25.0, "x_ew": 2.5, "x_floor": 1.25,
         "mem_x_ew": 2.8, "torchjd_reference": True},
        {"T": 4, "method": "DBMTL", "mode": "param/batched", "ms": 20.0, "x_ew": 2.0, "x_floor": 1.0, "mem_x_ew": 4.5},
    ]
    lines = benchmark.table(rows).splitlines()
    assert lines[0].split(" | ")[6:9] == ["× TorchJD", "peak mem × EW", "mem × TorchJD"]
    assert "| 0.80 | 4.50 | 1.60 | ok (≤1.15× floor) |" in lines[2]
    assert "| – | 6.00 | – | TorchJD (no target) |" in lines[3]
    assert "TorchJD (the × TorchJD reference)" in lines[4]
    assert "| – | 4.50 | – | ok (≤1.15× floor) |" in lines[5]  # no TorchJD counterpart


def test_a_missing_torchjd_is_a_clear_error_before_any_worker_starts(benchmark, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    with pytest.raises(ImportError, match=r"pip install 'mtl-lightning\[torchjd\]', or run with --no-torchjd"):
        benchmark.run([2], repeats=1, device="cpu", torchjd=True)


def test_run_rejects_an_unknown_allocator(benchmark):
    with pytest.raises(ValueError, match="allocator"):
        benchmark.run([2], repeats=1, device="cpu", allocator="jemalloc")


@pytest.mark.slow
@pytest.mark.parametrize("group", ["param", "rep"])
def test_one_group_times_every_configuration(benchmark, group):
    threads = torch.get_num_threads()
    try:
        rows = benchmark.run_group(2, group, repeats=2, device="cpu", inner=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    keys = {(r["method"], r["mode"]) for r in rows}
    methods = [name for name, cls in benchmark.METHODS.items() if group in cls.supported_modes]
    if group == "param":
        expected = {("EW", "- (param run)"), ("floor", "-")}
        expected |= {(m, f"param/{engine}") for m in methods for engine in ("batched", "looped")}
    else:
        expected = {("EW", "- (rep run)")} | {(m, "rep") for m in methods}
    assert keys == expected
    for r in rows:
        assert r["ms"] > 0 and math.isfinite(r["x_ew"]) and r["x_ew"] > 0 and r["mem_x_ew"] > 0
    reference = next(r for r in rows if r["method"] == ("floor" if group == "param" else "EW"))
    assert (reference["x_floor"] if group == "param" else reference["x_ew"]) == 1.0
    if group == "param":
        # Every method computes the T per-task gradients the floor computes: more memory than EW.
        assert all(r["mem_x_ew"] > 1.0 for r in rows if r["mode"].startswith("param"))


@pytest.mark.slow
def test_the_param_group_times_torchjds_step_beside_ours(benchmark):
    pytest.importorskip("torchjd.aggregation")
    threads = torch.get_num_threads()
    try:
        rows = benchmark.run_group(2, "param", repeats=1, device="cpu", inner=1, threads=1, torchjd=True)
    finally:
        torch.set_num_threads(threads)
    mapped = benchmark.torchjd_equivalents()
    by_key = {(r["method"], r["mode"]): r for r in rows}
    for name in benchmark.METHODS:
        if name not in mapped:
            assert not any(mode.startswith("param/torchjd") for method, mode in by_key if method == name)
            continue
        theirs = [r for (method, mode), r in by_key.items() if method == name and mode.startswith("param/torchjd")]
        assert theirs and sum(r["torchjd_reference"] for r in theirs) == 1, name
        for r in theirs:
            assert r["ms"] > 0 and r["mem_x_ew"] > 1.0 and "x_torchjd" not in r  # J is computed: more than EW
        for engine in ("batched", "looped"):
            ours = by_key[(name, f"param/{engine}")]
            assert math.isfinite(ours["x_torchjd"]) and ours["x_torchjd"] > 0 and ours["mem_x_torchjd"] > 0
