"""Step time and peak memory of every gradient method relative to EW and to the per-task-gradient floor.

    python experiments/benchmarks/gradient_methods.py [--tasks 2 4 8 16] [--repeats 7] [--inner 3] [--device cpu|cuda]

Reference workload (issue #4): batch 128 × 256 features, encoder MLP 256→512→512→512 (ReLU), T heads
Linear(512→10), cross-entropy, SGD, float32, 2 threads.

What is timed, per optimizer step, for every method: the module's forward and task losses
(``compute_losses``), the balancing callback's ``backward(ctx)`` (engine, all-reduce no-op, solver,
``.grad`` writing) and ``optimizer.step()`` + ``zero_grad`` — the exact path of
``MultiTaskModule.training_step`` minus logging, driven outside Lightning's loop on a module that a
real ``Trainer`` has set up. EW is the same path with :class:`EqualWeighting` (one backward).
The floor is the bare per-task gradient cost on the same path: forward, a loop of T
``torch.autograd.grad`` calls on the shared parameters, their mean written into ``.grad``, the step.
All configurations of one T are interleaved (round-robin, so that drift of the machine hits all alike);
in each round a configuration runs one untimed step and then ``--inner`` timed consecutive steps (the
caches and the allocator then hold what that method's steps use, as in training). Reported: the
median over rounds of the mean step time, and × EW / × floor as the median over rounds of the ratio
to the reference timed in the same round.

Peak memory: CUDA: ``max_memory_allocated`` over one step above the memory before it; CPU: the peak of
the cumulative allocations recorded by the PyTorch profiler over one step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from functools import partial
from typing import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mtl_lightning.balancing import BalancingContext, EqualWeighting
from mtl_lightning.gradients import (
    CAGrad, DBMTL, FairGrad, GradDrop, GradVac, IMTLG, MGDA, AlignedMTL, NashMTL, PCGrad, UPGrad,
)
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.tasks import ClassificationTask

METHODS: dict[str, Callable[..., object]] = {
    "MGDA": MGDA, "PCGrad": PCGrad, "GradVac": GradVac, "GradDrop": GradDrop, "CAGrad": CAGrad,
    "NashMTL": NashMTL, "IMTLG": IMTLG, "AlignedMTL": AlignedMTL, "UPGrad": UPGrad, "DBMTL": DBMTL,
    "FairGrad": FairGrad,
}


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
    optimizer = module.trainer.optimizers[0]
    balancer.setup(module.trainer, module, "fit")

    def step() -> None:
        head_inputs: dict[str, torch.Tensor] = {}
        features, _, losses = module.compute_losses(batch, "train", head_inputs)
        ctx = BalancingContext(losses=losses, task_names=module.task_names, features=features, batch=batch,
                               global_step=0, epoch=0, is_last_microbatch=True, _module=module,
                               head_inputs=head_inputs)
        balancer.backward(ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of the ratio to the reference timed in the same round: the machine's drift
    between rounds cancels out of each ratio."""
    return statistics.median(a / b for a, b in zip(samples, reference))


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
    times: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    for k, step in configs.items():  # warm-up
        step()
        step()
    for _ in range(repeats):
        for k, step in configs.items():
            step()  # untimed: the timed steps follow a step of their own configuration, as in training
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - start) / inner)
    memory = {k: peak_memory(step, device) for k, step in configs.items()}
    ew = times[reference]
    floor = times.get(("floor", "-"))
    return [{"T": t, "method": name, "mode": mode, "ms": 1e3 * statistics.median(samples),
             "x_ew": paired_ratio(samples, ew), "x_floor": paired_ratio(samples, floor) if floor else None,
             "mem_x_ew": memory[(name, mode)] / max(memory[reference], 1.0)}
            for (name, mode), samples in times.items()]


def run(tasks: list[int], repeats: int, device: str, inner: int = 3, threads: int = 2) -> list[dict[str, object]]:
    """Every T and group in a fresh process: a process that ran the param-mode steps (T×P Jacobians,
    tens of MB per step) leaves its heap in a state that slows every later step of the same process
    by up to 30%, which would bias whatever runs after them."""
    rows = []
    context = multiprocessing.get_context("spawn")
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
    args = parser.parse_args()
    print(f"device={args.device} threads={args.threads} torch={torch.__version__}")
    print(table(run(args.tasks, args.repeats, args.device, args.inner, args.threads)))


if __name__ == "__main__":
    main()
