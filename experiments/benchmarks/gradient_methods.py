"""Step time and peak memory of every gradient method relative to EW and to the per-task-gradient floor.

    python experiments/benchmarks/gradient_methods.py [--tasks 2 4 8 16] [--repeats 7] [--inner 3] [--device cpu|cuda]
        [--allocator retain|system]

Reference workload (issue #4): batch 128 × 256 features, encoder MLP 256→512→512→512 (ReLU), T heads
Linear(512→10), cross-entropy, SGD, float32, 2 threads.

What is timed, per optimizer step, for every method: the module's forward and task losses
(``compute_losses``), the balancing callback's ``backward(ctx)`` (engine, all-reduce no-op, solver,
``.grad`` writing) and ``optimizer.step()`` + ``zero_grad`` — the exact path of
``MultiTaskModule.training_step`` minus logging, driven outside Lightning's loop on a module that a
real ``Trainer`` has set up. EW is the same path with :class:`EqualWeighting` (one backward).
The floor is the bare per-task gradient cost on the same path: forward, a loop of T
``torch.autograd.grad`` calls on the shared parameters, their mean written into ``.grad``, the step.
All configurations of one T are interleaved round by round; in each round every configuration runs
one untimed step and then ``--inner`` timed consecutive steps (the caches and the allocator then hold
what that method's steps use, as in training), and the group's reference (the floor in param mode,
EW in rep mode) is timed before each configuration and once more at the end of the round. Reported:
the median over rounds of the mean step time; the ratio to the group's reference is the median over
rounds of the configuration's time over the mean of the two reference samples bracketing it (the
machine's drift, which on this VM moves a sample by ±10% within seconds, cancels out); the other
ratio (× EW in param mode) is the ratio of the medians.

Allocator (CPU): glibc's malloc serves the tens of MB of per-task gradients of param mode from fresh
``mmap`` regions and returns them to the kernel every step, so every step page-faults them back in
(5–8 k faults, 15–30 ms of kernel time per step at T = 16), by an amount that depends on the heap's
history and so differs between configurations and processes by up to 30%. ``--allocator retain``
(the default) runs the worker processes with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
set so that freed memory stays in the process for reuse (what jemalloc or tcmalloc, recommended by
PyTorch's CPU performance guide, do too); ``--allocator system`` keeps glibc's defaults.

Peak memory: CUDA: ``max_memory_allocated`` over one step above the memory before it; CPU: the peak of
the cumulative allocations recorded by the PyTorch profiler over one step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from functools import partial
from typing import Callable
from unittest import mock

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mtl_lightning.balancing import EqualWeighting
from mtl_lightning.core import MultiTaskStep, TorchBackend
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.registry import gradient_methods
from mtl_lightning.tasks import ClassificationTask

METHODS: dict[str, Callable[..., object]] = dict(gradient_methods())  # every registered gradient method


def build(num_tasks: int, device: str) -> tuple[MultiTaskModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(num_tasks)]
    module = MultiTaskModule(MLP(256, (512, 512, 512)), [ClassificationTask(name=n, num_classes=10) for n in names],
                             optimizer=partial(torch.optim.SGD, lr=1e-3))
    batch = {"input": torch.randn(128, 256)}
    for n in names:
        batch[n] = torch.randint(10, (128,))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))  # sets up strategy, precision, optimizer
    return module, {k: v.to(module.device) for k, v in batch.items()}


def make_step(module: MultiTaskModule, batch: dict[str, torch.Tensor], balancer: object) -> Callable[[], None]:
    balancer.setup(module.trainer, module, "fit")
    step = MultiTaskStep(module, TorchBackend(module.trainer.optimizers[0]))  # the framework's step, plain loop
    return lambda: step(batch, balancer)


def make_floor(module: MultiTaskModule, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = module.trainer.optimizers[0]
    shared = module.shared_parameters()

    def step() -> None:
        _, _, losses = module.compute_losses(batch, "train")
        values = list(losses.values())
        grads = [torch.autograd.grad(l, shared, retain_graph=i < len(values) - 1) for i, l in enumerate(values)]
        for p, *per_task in zip(shared, *grads):
            p.grad = torch.stack(per_task).mean(0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory(step: Callable[[], None], device: str) -> float:
    """Peak bytes allocated during one step, above the allocation level before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each op's own allocations (and the frees reported as "[memory]" events) in time order.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return float(peak)


#: glibc malloc tunables of ``--allocator retain``: serve every allocation below 1 GiB from the heap
#: (not from a fresh ``mmap``) and never give freed heap memory back to the kernel.
RETAINING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def bracketed_ratio(samples: list[float], before: list[float], after: list[float]) -> float:
    """Median over rounds of each sample's ratio to the mean of the reference samples timed just before
    and just after it: the machine's drift between samples cancels out of each ratio."""
    return statistics.median(2 * s / (b + a) for s, b, a in zip(samples, before, after))


def timed(step: Callable[[], None], inner: int, device: str) -> float:
    """Mean time of ``inner`` consecutive steps, after one untimed step of the same configuration."""
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(inner):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / inner


def run_group(t: int, group: str, repeats: int, device: str, inner: int, threads: int) -> list[dict[str, object]]:
    """The rows of one T and one group: ``"param"`` (EW, the floor, every param-mode method with both
    engines) or ``"rep"`` (EW and every rep-mode method)."""
    torch.set_num_threads(threads)
    module, batch = build(t, device)
    reference = ("EW", f"- ({group} run)")
    configs: dict[tuple[str, str], Callable[[], None]] = {reference: make_step(module, batch, EqualWeighting())}
    if group == "param":
        configs[("floor", "-")] = make_floor(module, batch)
    for name, cls in METHODS.items():
        if group == "param" and "param" in cls.supported_modes:
            configs[(name, "param/batched")] = make_step(module, batch, cls(mode="param", batched=True))
            configs[(name, "param/looped")] = make_step(module, batch, cls(mode="param", batched=False))
        if group == "rep" and "rep" in cls.supported_modes:
            configs[(name, "rep")] = make_step(module, batch, cls(mode="rep"))
    target = ("floor", "-") if group == "param" else reference
    others = [k for k in configs if k != target]
    times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    before: dict[tuple[str, str], list[float]] = {k: [] for k in others}
    after: dict[tuple[str, str], list[float]] = {k: [] for k in others}
    for step in configs.values():  # warm-up
        step()
        step()
    for _ in range(repeats):
        # reference, c1, reference, c2, …, reference: every configuration between two reference samples.
        last = timed(configs[target], inner, device)
        times[target].append(last)
        for k in others:
            times[k].append(timed(configs[k], inner, device))
            before[k].append(last)
            last = timed(configs[target], inner, device)
            after[k].append(last)
            times[target].append(last)
    memory = {k: peak_memory(step, device) for k, step in configs.items()}
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key, samples in times.items():
        name, mode = key
        to_target = 1.0 if key == target else bracketed_ratio(samples, before[key], after[key])
        x_ew = to_target if group == "rep" else medians[key] / medians[reference]
        x_floor = to_target if group == "param" else None
        rows.append({"T": t, "method": name, "mode": mode, "ms": 1e3 * medians[key], "x_ew": x_ew,
                     "x_floor": x_floor, "mem_x_ew": memory[key] / max(memory[reference], 1.0)})
    return rows


def run(tasks: list[int], repeats: int, device: str, inner: int = 3, threads: int = 2,
        allocator: str = "retain") -> list[dict[str, object]]:
    """Every T and group in a fresh process (with glibc's default allocator, a process that ran the
    param-mode steps leaves its heap in a state that slowed every later step of the same process by
    up to 30%), started with the allocator settings of ``allocator`` (see the module docstring)."""
    if allocator not in ("retain", "system"):
        raise ValueError(f"allocator must be 'retain' or 'system', got {allocator!r}.")
    rows = []
    context = multiprocessing.get_context("spawn")
    # Read by glibc when each spawned worker starts; the parent's environment is restored afterwards.
    with mock.patch.dict(os.environ, RETAINING_MALLOC if allocator == "retain" else {}):
        for t in tasks:
            for group in ("param", "rep"):
                with context.Pool(1) as pool:
                    rows += pool.apply(run_group, (t, group, repeats, device, inner, threads))
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| T | method | mode | step ms | × EW | × floor | peak mem × EW | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "param/looped":
            target = "(loop fallback, no target)"
        elif r["mode"].startswith("param"):
            target = "ok (≤1.15× floor)" if r["x_floor"] <= 1.15 else "MISSED (>1.15× floor)"
        elif r["mode"] == "rep":
            target = "ok (≤1.3× EW)" if r["x_ew"] <= 1.3 else "MISSED (>1.3× EW)"
        else:
            target = ""
        x_floor = "–" if r["x_floor"] is None else f"{r['x_floor']:.2f}"
        lines.append(f"| {r['T']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | {r['x_ew']:.2f} | "
                     f"{x_floor} | {r['mem_x_ew']:.2f} | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7, help="rounds over all configurations")
    parser.add_argument("--inner", type=int, default=3, help="consecutive timed steps per configuration and round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=["retain", "system"], default="retain",
                        help="retain: glibc keeps freed memory for reuse (no per-step page faults); system: glibc defaults")
    args = parser.parse_args()
    print(f"device={args.device} threads={args.threads} allocator={args.allocator} torch={torch.__version__}")
    print(table(run(args.tasks, args.repeats, args.device, args.inner, args.threads, args.allocator)))


if __name__ == "__main__":
    main()
