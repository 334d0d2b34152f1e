"""The synthetic-data benchmark of MMoE: shared-bottom vs OMoE vs MMoE as task correlation falls.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, Section 4 (doi 10.1145/3219819.3220007). Two regression tasks from
:class:`~mtl_lightning.data.CorrelatedRegressionDataModule` (d = 100, c = 1, m = 5 sines) whose
weight vectors have cosine p; three models of about the same size:

* shared-bottom: one shared hidden layer of 113 ReLU units (hard sharing);
* OMoE: 8 experts of one 16-unit hidden layer, one softmax gate for both tasks (``num_gates=1``);
* MMoE: the same experts, one softmax gate per task;

each with per-task towers of one 8-unit hidden layer, trained with Adam on the sum of the two MSEs.
For every (model, p, seed) the seed fixes the data (weight vectors, sines, samples), the
initialisation and the batch order. Reported: the test MSE averaged over the two tasks and the
final epoch's mean training loss averaged over the two tasks (the paper's quantity), mean ± sample
standard deviation over seeds, and both minus MMoE's on the same seed (a paired comparison: the
seed changes the data, and with it the difficulty, far more than the model does).

    PYTHONPATH=$PWD python experiments/architectures/mmoe_synthetic.py [--seeds 5] [--epochs 20]
        [--correlations 0.5 0.9 1.0] [--num-train 8000] [--out runs/mmoe_synthetic] [--quick]

Writes ``results.json``, ``results.md`` (the tables) and ``mmoe_synthetic.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
import warnings
from functools import partial
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from mtl_lightning.architectures import MMoE
from mtl_lightning.data.synthetic import CorrelatedRegressionDataModule
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import RegressionTask

#: Model key -> label, in the paper's order of presentation.
MODELS: dict[str, str] = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}
TASKS = ("y1", "y2")
DIM = 100  # d, the data module's default (paper: 100)
NUM_EXPERTS, EXPERT_HIDDEN, SHARED_HIDDEN, TOWER_HIDDEN = 8, 16, 113, 8  # the paper's sizes

#: The default run (about 6 min on one CPU thread) and the ``--quick`` one (a few seconds, for tests).
FULL = {"seeds": 5, "epochs": 20, "correlations": [0.5, 0.9, 1.0], "num_train": 8000, "num_test": 1000}
QUICK = {"seeds": 1, "epochs": 1, "correlations": [0.5, 1.0], "num_train": 256, "num_test": 200}


def build_encoder(model: str, dim: int = DIM) -> nn.Module:
    """The shared part of ``model``: an ``MLP(dim, (113,))`` (shared-bottom) or 8 ``MLP(dim, (16,))``
    experts under one gate (OMoE) or one gate per task (MMoE), Ma et al. 2018 §4."""
    if model == "shared_bottom":
        return MLP(dim, (SHARED_HIDDEN,))
    if model in ("omoe", "mmoe"):
        return MMoE(MLP(dim, (EXPERT_HIDDEN,)), NUM_EXPERTS, dim, num_gates=1 if model == "omoe" else "per_task")
    raise ValueError(f"unknown model {model!r}; choose from {list(MODELS)}.")


def build_module(model: str, lr: float, dim: int = DIM) -> MultiTaskModule:
    """``model``'s encoder with the two regression tasks' towers (one hidden layer of 8 units), Adam."""
    tasks = [RegressionTask(name, head_hidden=(TOWER_HIDDEN,)) for name in TASKS]
    return MultiTaskModule(build_encoder(model, dim), tasks, optimizer=partial(torch.optim.Adam, lr=lr))


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters (encoder, gates and towers)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class EpochLoss(pl.Callback):
    """Records the mean over the two tasks of each epoch's mean training loss."""

    def __init__(self) -> None:
        self.curve: list[float] = []

    # The module logs its epoch means in its own on_train_epoch_end, after the callbacks' hook: read
    # them when the next epoch starts and when training ends.
    def _record(self, trainer: pl.Trainer) -> None:
        metrics = trainer.callback_metrics
        if f"train/{TASKS[0]}/loss_epoch" in metrics and trainer.current_epoch > len(self.curve):
            self.curve.append(sum(float(metrics[f"train/{t}/loss_epoch"]) for t in TASKS) / len(TASKS))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)


def run_one(model: str, correlation: float, seed: int, epochs: int, num_train: int, num_test: int,
            lr: float, batch_size: int) -> dict[str, Any]:
    """Train ``model`` on the data of (``correlation``, ``seed``); its test MSEs and training losses."""
    pl.seed_everything(seed, verbose=False)
    data = CorrelatedRegressionDataModule(correlation, dim=DIM, num_train=num_train, num_val=1, num_test=num_test,
                                          batch_size=batch_size, eval_batch_size=1000, seed=seed)
    module = build_module(model, lr)
    pl.seed_everything(seed, verbose=False)  # the same batch order for every model of a seed
    losses = EpochLoss()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[losses])
    start = time.perf_counter()
    trainer.fit(module, data)
    test = trainer.test(module, data, verbose=False)[0]
    per_task = {t: float(test[f"test/{t}/mse"]) for t in TASKS}
    return {
        "model": model, "correlation": correlation, "seed": seed,
        "test_mse": sum(per_task.values()) / len(TASKS), "test_mse_per_task": per_task,
        "train_loss": losses.curve[-1], "train_loss_curve": losses.curve,
        "seconds": time.perf_counter() - start,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sample std over seeds of each (model, correlation), and the paired gaps to MMoE."""
    by_key = {(r["model"], r["correlation"], r["seed"]): r for r in runs}
    models = [m for m in MODELS if any(r["model"] == m for r in runs)]
    correlations = sorted({r["correlation"] for r in runs})
    rows = []
    for model in models:
        for p in correlations:
            mine = [r for r in runs if r["model"] == model and r["correlation"] == p]
            test_mean, test_std = _mean_std([r["test_mse"] for r in mine])
            train_mean, train_std = _mean_std([r["train_loss"] for r in mine])
            row = {"model": model, "correlation": p, "n": len(mine), "test_mse_mean": test_mean, "test_mse_std": test_std,
                   "train_loss_mean": train_mean, "train_loss_std": train_std}
            for metric in ("test_mse", "train_loss"):
                gaps = [r[metric] - by_key[("mmoe", p, r["seed"])][metric] for r in mine if ("mmoe", p, r["seed"]) in by_key]
                if gaps and model != "mmoe":
                    row[f"{metric}_gap_to_mmoe_mean"], row[f"{metric}_gap_to_mmoe_std"] = _mean_std(gaps)
                    row[f"{metric}_seeds_mmoe_better"] = sum(g > 0 for g in gaps)
            rows.append(row)
    return rows


def tables(summary: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """Markdown tables: test MSE, final training loss, and both minus MMoE's on the same seed."""
    correlations = sorted({r["correlation"] for r in summary})
    models = [m for m in MODELS if any(r["model"] == m for r in summary)]
    cell = {(r["model"], r["correlation"]): r for r in summary}
    head = "| model | params | " + " | ".join(f"p = {p:g}" for p in correlations) + " |"
    rule = "|---|---:|" + "---:|" * len(correlations)
    out = []
    for title, key in (("test MSE (mean of the two tasks), mean ± std over seeds", "test_mse"),
                       ("final training loss (last epoch's mean, mean of the two tasks), mean ± std over seeds", "train_loss")):
        out += [f"**{title}**", "", head, rule]
        for m in models:
            out.append(f"| {MODELS[m]} | {counts[m]:,} | " + " | ".join(
                f"{cell[m, p][key + '_mean']:.4f} ± {cell[m, p][key + '_std']:.4f}" for p in correlations) + " |")
        out.append("")
    others = [m for m in models if m != "mmoe" and "test_mse_gap_to_mmoe_mean" in cell[m, correlations[0]]]
    for title, key in (("test MSE", "test_mse"), ("final training loss", "train_loss")):
        if not others:
            break
        out += [f"**{title} minus MMoE's on the same seed, mean ± std (seeds where MMoE is lower / seeds)**", "",
                "| model | " + " | ".join(f"p = {p:g}" for p in correlations) + " |", "|---|" + "---:|" * len(correlations)]
        for m in others:
            out.append(f"| {MODELS[m]} | " + " | ".join(
                f"{cell[m, p][key + '_gap_to_mmoe_mean']:+.4f} ± {cell[m, p][key + '_gap_to_mmoe_std']:.4f} "
                f"({cell[m, p][key + '_seeds_mmoe_better']}/{cell[m, p]['n']})" for p in correlations) + " |")
        out.append("")
    return "\n".join(out)


def plot(summary: list[dict[str, Any]], runs: list[dict[str, Any]], path: str) -> None:
    """Left: test MSE vs correlation per model (error bars: std over seeds). Then one panel per
    correlation with the mean training-loss curves (the layout of the paper's synthetic-data figure).
    Without matplotlib it says so and draws nothing (results.json and results.md are written before)."""
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no figure (pip install "mtl-lightning[plots]").')
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correlations = sorted({r["correlation"] for r in summary})
    models = [m for m in MODELS if any(r["model"] == m for r in summary)]
    colors = {"shared_bottom": "tab:blue", "omoe": "tab:orange", "mmoe": "tab:green"}
    fig, axes = plt.subplots(1, 1 + len(correlations), figsize=(4.2 * (1 + len(correlations)), 3.6), squeeze=False)
    ax = axes[0][0]
    for i, m in enumerate(models):
        rows = sorted((r for r in summary if r["model"] == m), key=lambda r: r["correlation"])
        shift = (i - (len(models) - 1) / 2) * 0.008  # keep the error bars apart
        ax.errorbar([r["correlation"] + shift for r in rows], [r["test_mse_mean"] for r in rows],
                    yerr=[r["test_mse_std"] for r in rows], marker="o", capsize=3, label=MODELS[m], color=colors[m])
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("test MSE (mean of 2 tasks)")
    ax.set_title(f"test MSE, mean ± std over {summary[0]['n']} seeds", fontsize=10)
    ax.legend(fontsize=8)
    for ax, p in zip(axes[0][1:], correlations):
        for m in models:
            curves = [r["train_loss_curve"] for r in runs if r["model"] == m and r["correlation"] == p]
            mean = [statistics.fmean(c[e] for c in curves) for e in range(min(len(c) for c in curves))]
            ax.plot(range(1, len(mean) + 1), mean, label=MODELS[m], color=colors[m])
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (mean of 2 tasks)")
        ax.set_title(f"p = {p:g}: mean training loss over seeds", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Options; unset ones take the default run's values (or ``--quick``'s). Bad values exit with a message."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help=f"seeds 0 .. N-1 (default {FULL['seeds']})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {FULL['epochs']})")
    parser.add_argument("--correlations", type=float, nargs="+", help=f"task correlations p (default {FULL['correlations']})")
    parser.add_argument("--num-train", type=int, help=f"training samples (default {FULL['num_train']})")
    parser.add_argument("--num-test", type=int, help=f"test samples (default {FULL['num_test']})")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", default="runs/mmoe_synthetic", help="folder for results.json, results.md and the figure")
    parser.add_argument("--quick", action="store_true", help=f"tiny configuration for tests: {QUICK}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for option, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--num-train", args.num_train),
                          ("--num-test", args.num_test), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}.")
    bad = [p for p in args.correlations if not -1.0 <= p <= 1.0]
    if bad:
        parser.error(f"--correlations must lie in [-1, 1], got {bad}.")
    if len(set(args.correlations)) != len(args.correlations):
        parser.error(f"--correlations has repeated values: {args.correlations}.")
    if len(set(args.models)) != len(args.models):
        parser.error(f"--models has repeated values: {args.models}.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train every (model, correlation, seed); print the tables; write results.json, results.md, the figure."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.makedirs(args.out, exist_ok=True)
    counts = {m: parameter_count(build_module(m, args.lr)) for m in args.models}
    print("parameters: " + ", ".join(f"{MODELS[m]} {n:,}" for m, n in counts.items()), flush=True)
    start = time.perf_counter()
    runs = []
    try:
        for p in args.correlations:
            for seed in range(args.seeds):
                for model in args.models:
                    r = run_one(model, p, seed, args.epochs, args.num_train, args.num_test, args.lr, args.batch_size)
                    runs.append(r)
                    print(f"p={p:g} seed={seed} {MODELS[model]:>13}: test MSE {r['test_mse']:.4f}, "
                          f"train loss {r['train_loss']:.4f} [{r['seconds']:.1f} s]", flush=True)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    summary = summarize(runs)
    text = tables(summary, counts)
    print("\n" + text)
    print(f"total: {len(runs)} runs in {seconds:.0f} s")
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(dim=DIM, scale=1.0, num_sines=5, num_experts=NUM_EXPERTS, expert_hidden=EXPERT_HIDDEN,
                  shared_hidden=SHARED_HIDDEN, tower_hidden=TOWER_HIDDEN, optimizer="Adam")
    results = {"config": config, "parameter_counts": counts, "runs": runs, "summary": summary, "seconds": seconds,
               "torch": torch.__version__}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    plot(summary, runs, os.path.join(args.out, "mmoe_synthetic.png"))
    return results


if __name__ == "__main__":
    main()
