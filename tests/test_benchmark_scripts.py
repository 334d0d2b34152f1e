"""The gradient-method benchmark's measurement logic: the bracketed ratio, the rows, the target labels."""

from __future__ import annotations

import math
import os

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
