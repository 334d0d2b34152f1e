"""Step time and peak memory of every gradient method relative to EW and to the per-task-gradient floor.

    python experiments/benchmarks/gradient_methods.py [--tasks 2 4 8 16] [--repeats 7] [--inner 3] [--device cpu|cuda]
        [--allocator retain|system] [--torchjd | --no-torchjd]

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

TorchJD (``--torchjd``, the default; needs the optional ``torchjd`` extra): every param-mode method that
TorchJD also implements (:func:`torchjd_equivalents`, the one name → constructor mapping, built with
our default options) is timed a third way in the same group, process and rounds, on the same module,
batch and optimizer: TorchJD's own MTL step (its README and MTL example) — the module's forward and
losses, ``torchjd.autojac.mtl_backward(losses, features, tasks_params=heads, shared_params=encoder)``,
``jac_to_grad(encoder, aggregator)``, ``optimizer.step()`` + ``zero_grad``. ``jac_to_grad`` aggregates
either the concatenated T×P Jacobian (its default; row ``param/torchjd``) or, for aggregators that
weight the Gramian, the sum of per-parameter Gramians (``optimize_gramian_computation=True``; row
``param/torchjd-gramian``); TorchJD calls the second one lighter but up to 15% slower on CUDA, so both
are timed and our rows are compared with the faster (by median × floor, marked in the table). "× TorchJD"
is the median over rounds of the ratio of the two configurations' bracketed ratios of that round (ours
over TorchJD's, each against the floor samples around it); "mem × TorchJD" the ratio of their peaks.
Rep mode has no TorchJD counterpart (TorchJD's step differentiates the shared parameters).

Allocator (CPU): glibc's malloc serves the tens of MB of per-task gradients of param mode from fresh
``mmap`` regions and returns them to the kernel every step, so every step page-faults them back in
(5–8 k faults, 15–30 ms of kernel time per step at T = 16), by an amount that depends on the heap's
history and so differs between configurations and processes by up to 30%. ``--allocator retain``
(the default) runs the worker processes with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
set so that freed memory stays in the process for reuse (what jemalloc or tcmalloc, recommended by
PyTorch's CPU performance guide, do too); ``--allocator system`` keeps glibc's defaults.

Peak memory: CUDA: ``max_memory_allocated`` over one step above the memory before it; CPU: the peak
resident size of the process over one step above the resident size before it, with large allocations
served by ``mmap`` so that freed memory leaves the process (:func:`peak_memory`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.metadata
import multiprocessing
import os
import statistics
import time
from functools import partial
from typing import Any, Callable
from unittest import mock

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from mtl_lightning.balancing import EqualWeighting
from mtl_lightning.core import MultiTaskStep, TorchBackend
from mtl_lightning.gradients import GradientBalancer
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.registry import gradient_methods
from mtl_lightning.tasks import ClassificationTask

METHODS: dict[str, type[GradientBalancer]] = dict(gradient_methods())  # every registered gradient method


def import_torchjd() -> Any:
    """The ``torchjd`` package with its ``aggregation``, ``autojac`` and ``linalg`` modules loaded."""
    try:
        for name in ("torchjd.aggregation", "torchjd.autojac", "torchjd.linalg"):
            importlib.import_module(name)
    except ImportError as error:
        raise ImportError("The TorchJD comparison needs TorchJD: pip install 'mtl-lightning[torchjd]', "
                          "or run with --no-torchjd.") from error
    return importlib.import_module("torchjd")


def torchjd_equivalents() -> dict[str, Callable[[GradientBalancer, int], Any]]:
    """Registered method name → TorchJD aggregator computing the same update, built from an instance of
    our method (its options) and the number of tasks T. The one place where a method joins the TorchJD
    comparison: ``tests/test_benchmark_torchjd_mapping.py`` checks that each gives our method's direction
    on fixed Jacobians, and that a registered method with a TorchJD namesake is mapped here or listed in
    :data:`TORCHJD_EXCLUDED`. Options TorchJD does not have (the update's scale only) are noted."""
    jd = import_torchjd()
    aggregation, projector = jd.aggregation, jd.linalg.QuadprogProjector
    return {
        # TorchJD's defaults (its recommended options): Frank–Wolfe stopping at γ < 1e-3 or 100 iterations,
        # exact at T = 2 and short of our exact min-norm point at T > 2 (run to convergence, the same point).
        "MGDA": lambda ours, t: aggregation.MGDA(),
        "PCGrad": lambda ours, t: aggregation.PCGrad(),
        "GradVac": lambda ours, t: aggregation.GradVac(beta=ours.beta),
        # No ``rescale``: TorchJD's update is ours × (1 + c²).
        "CAGrad": lambda ours, t: aggregation.CAGrad(c=ours.c),
        "NashMTL": lambda ours, t: aggregation.NashMTL(n_tasks=t, max_norm=ours.max_norm,
                                                      update_weights_every=ours.update_every,
                                                      optim_niter=ours.iterations),
        "IMTLG": lambda ours, t: aggregation.IMTLG(),
        # TorchJD's default preference averages the aligned gradients, ours sums them: its update is ours / T.
        "AlignedMTL": lambda ours, t: aggregation.AlignedMTL(),
        "UPGrad": lambda ours, t: aggregation.UPGrad(projector=projector(norm_eps=ours.norm_eps, reg_eps=ours.reg_eps)),
        "DualProj": lambda ours, t: aggregation.DualProj(projector=projector(norm_eps=ours.norm_eps, reg_eps=ours.reg_eps)),
        "FairGrad": lambda ours, t: aggregation.FairGrad(alpha=ours.alpha),
        "ConFIG": lambda ours, t: aggregation.ConFIG(),
        # TorchJD's weighting of A = J₁J₂ᵀ with both batches the training batch (our setting): A = JJᵀ.
        "SDMGrad": lambda ours, t: aggregation.GramianWeightedAggregator(aggregation.SDMGradWeighting(
            lr=ours.lr, momentum=ours.momentum, n_iter=ours.iterations, lambda_=ours.lamda)),
        # TorchJD's weighting of G = J₁J₂ᵀ from two batches it computes itself; given the one batch's J, it
        # weights JJᵀ (what ours does on fixed Jacobians; in training ours splits the batch in two halves).
        "MoDo": lambda ours, t: aggregation.GramianWeightedAggregator(aggregation.MoDoWeighting(
            gamma=ours.gamma, rho=ours.rho)),
    }


#: Registered methods whose TorchJD namesake computes something else by design: not compared.
TORCHJD_EXCLUDED: dict[str, str] = {
    "GradDrop": "ours is rep mode only, with masks from sign(z) of the shared representation; TorchJD's "
                "GradDrop masks the rows of the parameter Jacobian (and has no rep mode)",
    "CRMOGM": "a wrapper: its cost is the wrapped method's (MGDA by default, compared above) plus a T-vector "
              "average; tested against TorchJD's CRMOGMWeighting in tests/test_method_cr_mogm.py",
    "ExcessMTL": "TorchJD's weights are T× smaller and, at its default n_warmup_steps=0, move on the first step "
                 "(the official code's stay at 1); tested against it in tests/test_method_excess_mtl.py",
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


def make_torchjd_steps(module: MultiTaskModule, batch: dict[str, torch.Tensor], name: str,
                       equivalent: Callable[[GradientBalancer, int], Any]) -> dict[str, Callable[[], None]]:
    """TorchJD's MTL step with the aggregator equivalent to our method ``name``, by mode: ``param/torchjd``
    (``jac_to_grad`` on the concatenated Jacobian) and, for aggregators of the Gramian,
    ``param/torchjd-gramian`` (summed per-parameter Gramians). Each has its own aggregator (state)."""
    jd = import_torchjd()
    optimizer = module.trainer.optimizers[0]
    shared = module.shared_parameters()
    names = module.task_names
    heads = [module.task_parameters(n) for n in names]
    ours = METHODS[name](mode="param")
    t = len(names)

    def make(aggregator: Any, gramian: bool) -> Callable[[], None]:
        def step() -> None:
            features, _, losses = module.compute_losses(batch, "train")
            jd.autojac.mtl_backward([losses[n] for n in names], features=features, tasks_params=heads,
                                    shared_params=shared)
            jd.autojac.jac_to_grad(shared, aggregator, optimize_gramian_computation=gramian)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {"param/torchjd": make(equivalent(ours, t), False)}
    second = equivalent(ours, t)
    if isinstance(second, jd.aggregation.GramianWeightedAggregator):
        steps["param/torchjd-gramian"] = make(second, True)
    return steps


def peak_memory(step: Callable[[], None], device: str) -> float:
    """Peak bytes allocated during one step, above the allocation level before it.

    CUDA: ``max_memory_allocated``. CPU: the peak resident set size of the process over the step
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident size before it, with
    glibc set to serve every allocation of 64 KiB or more from its own ``mmap`` (returned to the kernel when
    freed) and its free heap trimmed first, so that the resident size follows the live allocations. The
    PyTorch profiler's memory events are not used: they miss allocations made inside nested
    ``torch.func`` transforms (they put TorchJD's autogram Gramian of an embedding table, which raised
    the peak resident size by a gigabyte, at 3 MB). Everything the process allocates counts, NumPy's
    arrays included. Where procfs or glibc are missing (not Linux), the profiler's peak is the fallback.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/clear_refs", "w"):
            pass
    except OSError:
        return _profiled_peak(step)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    try:
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident size
        base = _status_kib("VmRSS")
        step()
        return float(1024 * (_status_kib("VmHWM") - base))
    finally:
        threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold) if threshold else 128 * 1024)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}.")


def _profiled_peak(step: Callable[[], None]) -> float:
    """The PyTorch profiler's peak of cumulative recorded allocations over one step (see :func:`peak_memory`)."""
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


def bracketed_ratios(samples: list[float], before: list[float], after: list[float]) -> list[float]:
    """Each round's sample over the mean of the reference samples timed just before and just after it:
    the machine's drift between samples cancels out of each ratio."""
    return [2 * s / (b + a) for s, b, a in zip(samples, before, after)]


def bracketed_ratio(samples: list[float], before: list[float], after: list[float]) -> float:
    """Median over rounds of :func:`bracketed_ratios`."""
    return statistics.median(bracketed_ratios(samples, before, after))


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of the ratio of two configurations' bracketed ratios of the same round: each
    is measured against the reference samples around it, so drift between the two cancels too."""
    return statistics.median(o / t for o, t in zip(ours, theirs))


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


def interleave(configs: dict[Any, Callable[[], None]], target: Any, repeats: int, inner: int,
               device: str) -> tuple[dict[Any, list[float]], dict[Any, list[float]], dict[Any, float]]:
    """Time every configuration against the reference ``target``, round by round: in each round the
    reference, then each other configuration followed by the reference again (every configuration
    between two reference samples). Returns each configuration's per-round step times, each other
    configuration's per-round bracketed ratios to the reference (:func:`bracketed_ratios`), and each
    configuration's peak memory of one step (:func:`peak_memory`)."""
    others = [k for k in configs if k != target]
    times: dict[Any, list[float]] = {k: [] for k in configs}
    before: dict[Any, list[float]] = {k: [] for k in others}
    after: dict[Any, list[float]] = {k: [] for k in others}
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
    rounds = {k: bracketed_ratios(times[k], before[k], after[k]) for k in others}
    return times, rounds, memory


def in_fresh_processes(jobs: list[tuple[Callable[..., list[dict[str, object]]], tuple[Any, ...]]],
                       allocator: str) -> list[dict[str, object]]:
    """The rows of every job ``(function, args)``, each run in a fresh spawned process (with glibc's
    default allocator, a process that ran the param-mode steps leaves its heap in a state that slowed
    every later step of the same process by up to 30%), started with the allocator settings of
    ``allocator`` (see the module docstring)."""
    if allocator not in ("retain", "system"):
        raise ValueError(f"allocator must be 'retain' or 'system', got {allocator!r}.")
    rows: list[dict[str, object]] = []
    context = multiprocessing.get_context("spawn")
    # Read by glibc when each spawned worker starts; the parent's environment is restored afterwards.
    with mock.patch.dict(os.environ, RETAINING_MALLOC if allocator == "retain" else {}):
        for function, args in jobs:
            with context.Pool(1) as pool:
                rows += pool.apply(function, args)
    return rows


def run_group(t: int, group: str, repeats: int, device: str, inner: int, threads: int,
              torchjd: bool = False) -> list[dict[str, object]]:
    """The rows of one T and one group: ``"param"`` (EW, the floor, every param-mode method with both
    engines, and with ``torchjd`` TorchJD's step for each method it implements) or ``"rep"`` (EW and
    every rep-mode method)."""
    torch.set_num_threads(threads)
    module, batch = build(t, device)
    reference = ("EW", f"- ({group} run)")
    configs: dict[tuple[str, str], Callable[[], None]] = {reference: make_step(module, batch, EqualWeighting())}
    if group == "param":
        configs[("floor", "-")] = make_floor(module, batch)
    equivalents = torchjd_equivalents() if torchjd and group == "param" else {}
    for name, cls in METHODS.items():
        if group == "param" and "param" in cls.supported_modes:
            configs[(name, "param/batched")] = make_step(module, batch, cls(mode="param", batched=True))
            configs[(name, "param/looped")] = make_step(module, batch, cls(mode="param", batched=False))
            if name in equivalents:
                try:
                    steps = make_torchjd_steps(module, batch, name, equivalents[name])
                except ImportError as error:  # an aggregator's own optional dependency (cvxpy, quadprog…)
                    print(f"No TorchJD comparison for {name}: {error}")
                    steps = {}
                configs.update({(name, mode): step for mode, step in steps.items()})
        if group == "rep" and "rep" in cls.supported_modes:
            configs[(name, "rep")] = make_step(module, batch, cls(mode="rep"))
    target = ("floor", "-") if group == "param" else reference
    others = [k for k in configs if k != target]
    times, rounds, memory = interleave(configs, target, repeats, inner, device)
    medians = {k: statistics.median(v) for k, v in times.items()}
    # Per method, TorchJD's faster step (by median × floor): the reference of our rows' "× TorchJD".
    torchjd_reference: dict[str, tuple[str, str]] = {}
    for key in others:
        name, mode = key
        if mode.startswith("param/torchjd"):
            best = torchjd_reference.get(name)
            if best is None or statistics.median(rounds[key]) < statistics.median(rounds[best]):
                torchjd_reference[name] = key
    rows = []
    for key in times:
        name, mode = key
        to_target = 1.0 if key == target else statistics.median(rounds[key])
        x_ew = to_target if group == "rep" else medians[key] / medians[reference]
        x_floor = to_target if group == "param" else None
        row: dict[str, object] = {"T": t, "method": name, "mode": mode, "ms": 1e3 * medians[key], "x_ew": x_ew,
                                  "x_floor": x_floor, "mem_x_ew": memory[key] / max(memory[reference], 1.0)}
        theirs = torchjd_reference.get(name)
        if theirs is not None and mode in ("param/batched", "param/looped"):
            row["x_torchjd"] = paired_ratio(rounds[key], rounds[theirs])
            row["mem_x_torchjd"] = memory[key] / max(memory[theirs], 1.0)
        if mode.startswith("param/torchjd"):
            row["torchjd_reference"] = key == theirs
        rows.append(row)
    return rows


def run(tasks: list[int], repeats: int, device: str, inner: int = 3, threads: int = 2,
        allocator: str = "retain", torchjd: bool = False) -> list[dict[str, object]]:
    """Every T and group in a fresh process (:func:`in_fresh_processes`, which checks ``allocator``)."""
    if torchjd:
        import_torchjd()  # a missing TorchJD is said here, not in a worker
    jobs = [(run_group, (t, group, repeats, device, inner, threads, torchjd)) for t in tasks for group in ("param", "rep")]
    return in_fresh_processes(jobs, allocator)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| T | method | mode | step ms | × EW | × floor | × TorchJD | peak mem × EW | mem × TorchJD | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value: object) -> str:
        return "–" if value is None else f"{value:.2f}"

    for r in rows:
        if r["mode"] == "param/looped":
            target = "(loop fallback, no target)"
        elif r["mode"].startswith("param/torchjd"):
            target = "TorchJD (the × TorchJD reference)" if r["torchjd_reference"] else "TorchJD (no target)"
        elif r["mode"].startswith("param"):
            target = "ok (≤1.15× floor)" if r["x_floor"] <= 1.15 else "MISSED (>1.15× floor)"
        elif r["mode"] == "rep":
            target = "ok (≤1.3× EW)" if r["x_ew"] <= 1.3 else "MISSED (>1.3× EW)"
        else:
            target = ""
        lines.append(f"| {r['T']} | {r['method']} | {r['mode']} | {r['ms']:.1f} | {r['x_ew']:.2f} | "
                     f"{cell(r['x_floor'])} | {cell(r.get('x_torchjd'))} | {r['mem_x_ew']:.2f} | "
                     f"{cell(r.get('mem_x_torchjd'))} | {target} |")
    return "\n".join(lines)


def add_timing_arguments(parser: argparse.ArgumentParser, repeats: int, inner: int) -> None:
    """The options of the timing machinery (:func:`interleave`, :func:`in_fresh_processes`) that every
    benchmark script built on it takes, with the script's default ``repeats`` and ``inner``."""
    parser.add_argument("--repeats", type=int, default=repeats, help="rounds over all configurations")
    parser.add_argument("--inner", type=int, default=inner, help="consecutive timed steps per configuration and round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=["retain", "system"], default="retain",
                        help="retain: glibc keeps freed memory for reuse (no per-step page faults); system: glibc defaults")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    add_timing_arguments(parser, repeats=7, inner=3)
    parser.add_argument("--torchjd", action=argparse.BooleanOptionalAction, default=True,
                        help="also time TorchJD's MTL step for every method it implements (needs TorchJD)")
    args = parser.parse_args()
    versions = f"torch={torch.__version__}"
    if args.torchjd:
        try:
            import_torchjd()
            versions += f" torchjd={importlib.metadata.version('torchjd')}"
        except ImportError as error:
            parser.error(str(error))
    print(f"device={args.device} threads={args.threads} allocator={args.allocator} {versions}")
    print(table(run(args.tasks, args.repeats, args.device, args.inner, args.threads, args.allocator, args.torchjd)))


if __name__ == "__main__":
    main()
