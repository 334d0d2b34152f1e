"""Step time and peak memory of multi-task learning on a BERT-like transformer, against the per-task-gradient
floor, EW and TorchJD, for T tasks.

    python experiments/benchmarks/pretrained_scale.py [--size tiny|small|base] [--tasks 2 4 8 16] [--batch 8]
        [--seq-len 64] [--method UPGrad] [--repeats 3] [--inner 1] [--threads 2] [--allocator retain|system]

The model: a ``transformers.BertModel`` at random init built from a ``BertConfig`` (``--size``: ``tiny``
≈1 M parameters, for tests; ``small`` ≈23 M, all-MiniLM-L6-v2's shape; ``base`` ≈109 M, BERT-base: hidden
768, 12 layers, 12 heads, intermediate 3072), dropout 0, saved to a temporary folder and read back by
:class:`~mtl_lightning.models.TransformerEncoder` (CLS pooling; nothing is downloaded), T classification
heads Linear(hidden→10), SGD, float32. The batch: ``--batch`` sequences of ``--seq-len`` random token ids.

Two groups per T, each in a fresh process:

- ``all`` — the whole transformer trainable, hard sharing (the pooled features feed every head). Configurations:
  ``EW`` (one backward); ``floor`` (T ``torch.autograd.grad`` calls on the shared parameters and their
  mean, :func:`gradient_methods.make_floor`); the method in param mode (the T × P Jacobian of all ~P
  backbone parameters), with the engine's T backward passes as one vmapped backward (``param/batched``,
  the default) and as a loop (``param/looped``), and with the Gramian engine (``param/gramian``:
  ``engine="gramian"``, the Gramian streamed out of one vmapped backward without the Jacobian, the
  embedding tables' part from their lookups, then one backward of the weighted rows); the method in rep
  mode (the Jacobian w.r.t. the pooled features, one backward of the weighted sum); TorchJD's MTL step with the same aggregator: ``torchjd autojac`` and
  ``torchjd autojac-gramian`` (``mtl_backward`` + ``jac_to_grad`` on the concatenated Jacobian / on summed
  per-parameter Gramians, as :func:`gradient_methods.make_torchjd_steps` times it) and ``torchjd autogram``
  (``torchjd.autogram.Engine`` on the encoder with ``batch_dim=None``: the T×T Gramian of the T mean losses
  computed layer by layer without the Jacobian, the weighting's weights, ``losses.backward(weights)``).
- ``lora`` — the backbone frozen, :class:`~mtl_lightning.architectures.PerTaskLoRA` (r = 8, α = 16, on
  ``query`` and ``value``, a shared adapter): the shared parameters are the shared adapter only, each task
  has its own adapter and head (T backbone passes per step). Configurations: ``EW``, ``floor``, the
  method in param mode (``param/looped``: ``PerTaskLoRA`` declares ``separate_task_passes``, so the
  engine loops whether ``batched`` or not; the Gramian engine refuses it), ``torchjd autojac`` and
  ``torchjd autojac-gramian`` (no
  shared representation for ``mtl_backward``: ``autojac.backward`` of the T losses w.r.t. the shared
  adapter and each task's own parameters, ``jac_to_grad`` on the shared adapter, each task-own
  parameter's Jacobian summed over tasks into its ``.grad``; exact, every other row is zero). Rep mode and autogram do not apply: per-task
  adapters give no shared representation, and autogram needs the differentiated parameters to be the
  direct parameters of modules that are called, where a LoRA layer holds the shared and the per-task
  adapters side by side.

The timing is :mod:`gradient_methods`' (imported from it): every configuration of a group interleaved
round by round between two samples of the group's floor (:func:`gradient_methods.interleave`), one
untimed step then ``--inner`` timed steps per sample; "× floor" is the median over rounds of the bracketed
ratio, "× EW" and "× TorchJD" the median over rounds of the ratio of two configurations' bracketed ratios
(:func:`gradient_methods.paired_ratio`; the drift of the machine cancels); peak memory is one step's
(:func:`gradient_methods.peak_memory`: CPU, the peak resident size of the process over the step above
the size before it, large allocations served by their own ``mmap``; CUDA, ``max_memory_allocated``
above the level before it). "TorchJD best" is TorchJD's fastest engine of
the group (by median × floor); the memory ratio is to TorchJD's smallest peak.

Targets (issue 20), in the ``target`` column of the method's param-mode rows: ≤ 1.15× the floor on the
same parameters, and time and peak memory ≤ 0.8× TorchJD's best engine. Rep mode's row shows its ratios
to TorchJD too (a different update on the same model: the choice a user makes at this size), with the
gradient benchmark's rep target, ≤ 1.3× EW.

Differences from a user's TorchJD step, noted where they matter: the autogram engine is created at the
start of each of its steps and dropped at its end (its forward hooks would otherwise run in every other
configuration's steps; creating it costs well under a millisecond beside a step), and with it the heads
receive their task's weighted gradient wᵢ·∇ (``losses.backward(weights)``), where ours and autojac give
each head its own gradient (the same cost).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.benchmarks.gradient_methods import (  # noqa: E402
    METHODS,
    add_timing_arguments,
    import_torchjd,
    in_fresh_processes,
    interleave,
    make_floor,
    make_step,
    make_torchjd_steps,
    paired_ratio,
    torchjd_equivalents,
)
from mtl_lightning.architectures import PerTaskLoRA  # noqa: E402
from mtl_lightning.balancing import EqualWeighting  # noqa: E402
from mtl_lightning.models import TransformerEncoder  # noqa: E402
from mtl_lightning.models.module import MultiTaskModule  # noqa: E402
from mtl_lightning.tasks import ClassificationTask  # noqa: E402

#: ``--size`` → BertConfig options (parameters, pooler excluded: tiny 0.9 M, small 22.7 M, base 108.9 M).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "small": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                  intermediate_size=1536),
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}
GROUPS = ("all", "lora")
LORA: dict[str, Any] = dict(r=8, alpha=16.0, target_modules=("query", "value"), shared_adapter=True)
NUM_CLASSES = 10


def save_model(size: str, seq_len: int, folder: str) -> None:
    """A random-init BERT of preset ``size`` (dropout 0), written to ``folder`` by ``save_pretrained``."""
    import transformers

    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}.")
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES[size], max_position_embeddings=max(512, seq_len),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(folder)


def build(folder: str, group: str, num_tasks: int, batch_size: int, seq_len: int,
          device: str) -> tuple[MultiTaskModule, dict[str, Any]]:
    """The module of ``group`` (``"all"``: the trainable transformer; ``"lora"``: frozen, per-task LoRA),
    set up by a real ``Trainer``, and a batch of random tokens on its device."""
    torch.manual_seed(0)
    encoder = TransformerEncoder(folder, pooling="cls", trainable=group == "all")
    # AutoModel builds BERT with a pooler (randomly initialised: the folder has none) that CLS pooling
    # never reads; gone, so that every trainable shared parameter reaches the losses.
    encoder.backbone.pooler = None
    names = [f"t{i}" for i in range(num_tasks)]
    module = MultiTaskModule(PerTaskLoRA(encoder, **LORA) if group == "lora" else encoder,
                             [ClassificationTask(name=n, num_classes=NUM_CLASSES) for n in names],
                             optimizer=partial(torch.optim.SGD, lr=1e-3))
    vocab = int(encoder.backbone.config.vocab_size)
    tokens = {"input_ids": torch.randint(1, vocab, (batch_size, seq_len)),
              "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    batch: dict[str, Any] = {"input": tokens}
    for n in names:
        batch[n] = torch.randint(NUM_CLASSES, (batch_size,))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="gpu" if device == "cuda" else "cpu", devices=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))  # type: ignore[arg-type]  # sets up the optimizer
    tokens = {k: v.to(module.device) for k, v in tokens.items()}
    return module, {"input": tokens, **{n: batch[n].to(module.device) for n in names}}


def make_autogram_step(module: MultiTaskModule, batch: dict[str, Any], aggregator: Any) -> Callable[[], None]:
    """TorchJD's autogram step: the T×T Gramian of the T mean losses w.r.t. the encoder's parameters
    (``Engine(encoder, batch_dim=None)``), the aggregator's weighting of it, ``losses.backward(weights)``."""
    jd = import_torchjd()
    importlib.import_module("torchjd.autogram")
    optimizer = module.trainer.optimizers[0]
    names = module.task_names
    weighting = aggregator.gramian_weighting

    def step() -> None:
        engine = jd.autogram.Engine(module.encoder, batch_dim=None)  # hooks the encoder's layers
        _, _, losses = module.compute_losses(batch, "train")
        values = torch.stack([losses[n] for n in names])
        weights = weighting(engine.compute_gramian(values))
        values.backward(weights)
        del engine  # removes its hooks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_torchjd_backward_steps(module: MultiTaskModule, batch: dict[str, Any], aggregator: Any,
                                second: Any) -> dict[str, Callable[[], None]]:
    """TorchJD's step where the tasks share no representation (per-task LoRA): ``autojac.backward`` of the
    T losses w.r.t. the shared and the task-own parameters, ``jac_to_grad`` on the shared ones (concatenated
    Jacobian, and summed Gramians with ``second``), each task-own parameter's Jacobian summed into ``.grad``."""
    jd = import_torchjd()
    optimizer = module.trainer.optimizers[0]
    shared = module.shared_parameters()
    own = module.unshared_parameters()
    names = module.task_names

    def make(aggregation: Any, gramian: bool) -> Callable[[], None]:
        def step() -> None:
            _, _, losses = module.compute_losses(batch, "train")
            jd.autojac.backward([losses[n] for n in names], inputs=shared + own)
            jd.autojac.jac_to_grad(shared, aggregation, optimize_gramian_computation=gramian)
            for p in own:
                p.grad = p.jac.sum(0)  # type: ignore[attr-defined]  # only its task's row is non-zero
                del p.jac  # type: ignore[attr-defined]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {"torchjd autojac": make(aggregator, False)}
    if isinstance(second, jd.aggregation.GramianWeightedAggregator):
        steps["torchjd autojac-gramian"] = make(second, True)
    return steps


def run_group(folder: str, t: int, group: str, method: str, batch_size: int, seq_len: int, repeats: int,
              device: str, inner: int, threads: int) -> list[dict[str, object]]:
    """The rows of one T and one group (see the module docstring)."""
    torch.set_num_threads(threads)
    module, batch = build(folder, group, t, batch_size, seq_len, device)
    cls = METHODS[method]
    equivalent = torchjd_equivalents().get(method)
    configs: dict[tuple[str, str], Callable[[], None]] = {
        ("floor", "-"): make_floor(module, batch),
        ("EW", "-"): make_step(module, batch, EqualWeighting()),
    }
    if group == "all":
        configs[(method, "param/batched")] = make_step(module, batch, cls(mode="param", batched=True))
    # Per-task LoRA makes the engine loop (separate_task_passes), batched or not: one row.
    configs[(method, "param/looped")] = make_step(module, batch, cls(mode="param", batched=False))
    if group == "all" and cls(mode="param").weights_from_gramian:
        configs[(method, "param/gramian")] = make_step(module, batch, cls(mode="param", engine="gramian"))
    if group == "all" and "rep" in cls.supported_modes:
        configs[(method, "rep")] = make_step(module, batch, cls(mode="rep"))
    if equivalent is not None:
        ours = cls(mode="param")
        if group == "all":
            steps = make_torchjd_steps(module, batch, method, equivalent)
            configs.update({(method, mode.replace("param/torchjd", "torchjd autojac")): s for mode, s in steps.items()})
            aggregator = equivalent(ours, t)
            if isinstance(aggregator, import_torchjd().aggregation.GramianWeightedAggregator):
                configs[(method, "torchjd autogram")] = make_autogram_step(module, batch, aggregator)
        else:
            steps = make_torchjd_backward_steps(module, batch, equivalent(ours, t), equivalent(ours, t))
            configs.update({(method, mode): s for mode, s in steps.items()})
    target = ("floor", "-")
    times, rounds, memory = interleave(configs, target, repeats, inner, device)
    rounds[target] = [1.0] * repeats
    theirs = [k for k in configs if k[1].startswith("torchjd")]
    fastest = min(theirs, key=lambda k: statistics.median(rounds[k])) if theirs else None
    smallest = min(theirs, key=lambda k: memory[k]) if theirs else None
    parameters = sum(p.numel() for p in module.shared_parameters())
    rows = []
    for key in configs:
        name, mode = key
        row: dict[str, object] = {
            "T": t, "group": group, "shared_params": parameters, "method": name, "mode": mode,
            "ms": 1e3 * statistics.median(times[key]), "x_floor": statistics.median(rounds[key]),
            "x_ew": paired_ratio(rounds[key], rounds[("EW", "-")]), "mem_mb": memory[key] / 2**20,
            "mem_x_floor": memory[key] / max(memory[target], 1.0),
            "mem_x_ew": memory[key] / max(memory[("EW", "-")], 1.0),
        }
        if fastest is not None and smallest is not None and name == method and not mode.startswith("torchjd"):
            row["x_torchjd"] = paired_ratio(rounds[key], rounds[fastest])
            row["mem_x_torchjd"] = memory[key] / max(memory[smallest], 1.0)
        if mode.startswith("torchjd"):
            row["torchjd_best"] = ", ".join(part for part, best in (("time", key == fastest),
                                                                    ("memory", key == smallest)) if best)
        rows.append(row)
    return rows


def run(tasks: list[int], size: str = "small", method: str = "UPGrad", batch_size: int = 8, seq_len: int = 64,
        repeats: int = 3, device: str = "cpu", inner: int = 1, threads: int = 2,
        allocator: str = "retain") -> list[dict[str, object]]:
    """Every T and group in a fresh process, on one model folder written here."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}.")
    if method not in METHODS or "param" not in METHODS[method].supported_modes:
        usable = [n for n, c in METHODS.items() if "param" in c.supported_modes]
        raise ValueError(f"method must be a registered gradient method with a param mode, one of {usable}; "
                         f"got {method!r}.")
    import_torchjd()  # a missing TorchJD is said here, not in a worker
    with tempfile.TemporaryDirectory() as folder:
        save_model(size, seq_len, folder)
        jobs = [(run_group, (folder, t, group, method, batch_size, seq_len, repeats, device, inner, threads))
                for t in tasks for group in GROUPS]
        return in_fresh_processes(jobs, allocator)


def target(row: dict[str, object]) -> str:
    """The issue's targets met or missed by ``row``; empty for rows without a target."""
    mode = str(row["mode"])
    if mode.startswith("torchjd"):
        best = row.get("torchjd_best")
        return f"TorchJD best ({best})" if best else ""
    if row["method"] in ("floor", "EW"):
        return ""
    checks = []
    if mode.startswith("param"):
        checks.append(("≤1.15× floor", float(row["x_floor"]) <= 1.15))  # type: ignore[arg-type]
    else:
        checks.append(("≤1.3× EW", float(row["x_ew"]) <= 1.3))  # type: ignore[arg-type]
    if "x_torchjd" in row:
        checks.append(("time ≤0.8× TorchJD", float(row["x_torchjd"]) <= 0.8))  # type: ignore[arg-type]
        checks.append(("mem ≤0.8× TorchJD", float(row["mem_x_torchjd"]) <= 0.8))  # type: ignore[arg-type]
    return "; ".join(f"{label} {'ok' if ok else 'MISSED'}" for label, ok in checks)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| T | parameters differentiated | method | mode | step ms | × floor | × EW | × TorchJD best | "
             "peak MB | mem × floor | mem × EW | mem × TorchJD best | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value: object) -> str:
        return "–" if value is None else f"{value:.2f}"

    for r in rows:
        what = "all (backbone)" if r["group"] == "all" else "LoRA (shared adapter)"
        lines.append(f"| {r['T']} | {what}, {float(r['shared_params']) / 1e6:.2f} M | {r['method']} | {r['mode']} | "  # type: ignore[arg-type]
                     f"{r['ms']:.0f} | {cell(r['x_floor'])} | {cell(r['x_ew'])} | {cell(r.get('x_torchjd'))} | "
                     f"{r['mem_mb']:.1f} | {cell(r['mem_x_floor'])} | {cell(r['mem_x_ew'])} | "
                     f"{cell(r.get('mem_x_torchjd'))} | {target(r)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--method", default="UPGrad", help="a registered gradient method with a param mode")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    add_timing_arguments(parser, repeats=3, inner=1)
    args = parser.parse_args()
    try:
        import_torchjd()
    except ImportError as error:
        parser.error(str(error))
    versions = " ".join(f"{p}={importlib.metadata.version(p)}" for p in ("torch", "transformers", "torchjd"))
    print(f"size={args.size} batch={args.batch} seq_len={args.seq_len} method={args.method} device={args.device} "
          f"threads={args.threads} allocator={args.allocator} repeats={args.repeats} inner={args.inner} {versions}")
    rows = run(args.tasks, args.size, args.method, args.batch, args.seq_len, args.repeats, args.device, args.inner,
               args.threads, args.allocator)
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
