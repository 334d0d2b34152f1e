"""MTAN (Liu, Johns & Davison, CVPR 2019) against hard parameter sharing on MultiDigits.

Both models have the same trunk, SmallCNN's layers: Conv3×3(1→c1)-ReLU, Conv3×3(c1→c2)-ReLU,
MaxPool2d(2), Flatten, Linear(→F)-ReLU.

* **hard**: ``SmallCNN(channels=(c1, c2), out_features=F)``; both heads read its features.
* **mtan**: ``MTAN`` over the same layers: stage 1 = (conv1 → u_1, ReLU → p_1), stage 2 =
  (conv2 → u_2, ReLU → p_2); each task's attention masks multiply p_1 and p_2 (12×12, before the
  pooling, as lorenmt/mtan), the shared 3×3 layer f_1 carries task 1's attended features into
  stage 2's mask, and the shared tail (MaxPool, Flatten, Linear, ReLU) maps each task's attended
  output to F features. MTAN adds f_1 and two attention modules per task.

Same data, optimizer (Adam, ew.yaml's lr 2e-3), batch size, epochs, seeds and batch order for both
models; with the same seed the trunk starts from the same weights (built in the same order).
Each setting (``--num-train`` pairs, trained for the matching ``--epochs``) is trained with seeds
0 … N-1 (the seed drives the data, the initialisation and the batch order). No model selection:
the test accuracy after the last epoch is reported (mean ± sample std over seeds), with the paired
difference MTAN − hard of the mean accuracy over the two digits.

    PYTHONPATH=$PWD python experiments/architectures/mtan_multidigits.py [--seeds 5] [--out runs/mtan_multidigits]

``conv_stage`` and ``pooled_tail`` are also the building blocks of ``mtan_multidigits.yaml`` (an
``nn.Sequential`` takes ``*args``, which a LightningCLI config cannot give).
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

import torch
from torch import nn

from mtl_lightning.architectures import MTAN

TASKS = ("left", "right")
MODELS = ("hard", "mtan")
FULL = {"seeds": 5, "num_train": [10000, 1000], "epochs": [5, 50], "channels": [16, 32], "features": 64,
        "num_test": 2000, "batch_size": 128}
QUICK = {"seeds": 2, "num_train": [128, 64], "epochs": [1, 2], "channels": [4, 8], "features": 16,
         "num_test": 64, "batch_size": 32}


def conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """One of SmallCNN's conv layers as an MTAN stage: Conv3×3 (its output is u) then ReLU (p)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


def pooled_tail(channels: int, image_size: int, out_features: int) -> nn.Sequential:
    """The rest of SmallCNN, shared by the tasks: MaxPool2d(2), Flatten, Linear, ReLU."""
    return nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * (image_size // 2) ** 2, out_features), nn.ReLU())


def build_mtan(channels: Sequence[int], features: int, image_size: int = 12) -> MTAN:
    """MTAN over SmallCNN's layers (created in SmallCNN's order, so a seed gives the same trunk)."""
    c1, c2 = channels
    stages = [conv_stage(1, c1), conv_stage(c1, c2)]
    return MTAN(stages, [c1, c2], tail=pooled_tail(c2, image_size, features), out_features=features)


def build_encoder(model: str, channels: Sequence[int], features: int) -> nn.Module:
    """The encoder of ``model`` ("hard": SmallCNN, "mtan": MTAN on the same layers)."""
    from mtl_lightning.models import SmallCNN

    if model == "hard":
        return SmallCNN(in_channels=1, image_size=12, channels=tuple(channels), out_features=features)
    if model == "mtan":
        return build_mtan(channels, features)
    raise ValueError(f"unknown model {model!r}; choose from {list(MODELS)}.")


def build_module(model: str, channels: Sequence[int], features: int, lr: float) -> Any:
    """A two-task ``MultiTaskModule`` (left / right digit) on ``model``'s encoder."""
    from mtl_lightning.models import MultiTaskModule
    from mtl_lightning.tasks import ClassificationTask

    return MultiTaskModule(build_encoder(model, channels, features), [ClassificationTask(t, 10) for t in TASKS],
                           optimizer=partial(torch.optim.Adam, lr=lr))


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def parameter_counts(module: Any) -> dict[str, int]:
    """Parameters by part: the trunk (SmallCNN's layers), MTAN's shared inter-stage layers, the
    attention modules (all tasks), the heads, and the total."""
    encoder = module.encoder
    if isinstance(encoder, MTAN):
        counts = {"trunk": _count(encoder.stages, encoder.tail), "inter_stage": _count(encoder.blocks),
                  "attention": _count(encoder.attention)}
    else:
        counts = {"trunk": _count(encoder), "inter_stage": 0, "attention": 0}
    counts["heads"] = _count(module.heads)
    counts["total"] = _count(module)
    return counts


def train_one(model: str, seed: int, num_train: int, epochs: int, cfg: argparse.Namespace) -> dict[str, Any]:
    """Train ``model`` with ``seed`` on ``num_train`` pairs for ``epochs``; test accuracy per task."""
    import lightning.pytorch as pl

    from mtl_lightning.data import MultiDigitsDataModule

    pl.seed_everything(seed, verbose=False)
    # Validation is not used (no model selection): one pair keeps the datamodule's val split cheap.
    dm = MultiDigitsDataModule(num_train=num_train, num_val=1, num_test=cfg.num_test, batch_size=cfg.batch_size,
                               eval_batch_size=512, seed=seed)
    module = build_module(model, cfg.channels, cfg.features, cfg.lr)
    pl.seed_everything(seed, verbose=False)  # the same batch order for every model
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    metrics = trainer.test(module, dm, verbose=False)[0]
    test = {t: float(metrics[f"test/{t}/accuracy"]) for t in TASKS}
    test["mean"] = sum(test[t] for t in TASKS) / len(TASKS)
    return {"model": model, "seed": seed, "num_train": num_train, "epochs": epochs, "steps": trainer.global_step,
            "test": test, "train_seconds": seconds}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per setting and model: mean ± std over seeds; per setting: the paired MTAN − hard difference."""
    summary, paired = [], []
    for num_train in dict.fromkeys(r["num_train"] for r in runs):
        for model in MODELS:
            rows = [r for r in runs if r["num_train"] == num_train and r["model"] == model]
            if not rows:
                continue
            entry: dict[str, Any] = {"num_train": num_train, "epochs": rows[0]["epochs"], "steps": rows[0]["steps"],
                                     "model": model, "seeds": len(rows),
                                     "train_seconds": statistics.fmean(r["train_seconds"] for r in rows)}
            for key in (*TASKS, "mean"):
                entry[key], entry[f"{key}_std"] = _mean_std([r["test"][key] for r in rows])
            summary.append(entry)
        by_seed = {m: {r["seed"]: r["test"]["mean"] for r in runs if r["num_train"] == num_train and r["model"] == m}
                   for m in MODELS}
        seeds = sorted(set(by_seed["hard"]) & set(by_seed["mtan"]))
        if seeds:
            deltas = [by_seed["mtan"][s] - by_seed["hard"][s] for s in seeds]
            mean, std = _mean_std(deltas)
            paired.append({"num_train": num_train, "delta_mean": mean, "delta_std": std,
                           "mtan_better": sum(d > 0 for d in deltas), "seeds": len(seeds)})
    return summary, paired


def table(summary: list[dict[str, Any]], paired: list[dict[str, Any]], params: dict[str, dict[str, int]]) -> str:
    """The results as a Markdown table (accuracies in %)."""
    lines = ["| train pairs | epochs (steps) | model | params | left acc % | right acc % | mean acc % | Δ mean vs hard (MTAN better) | train s/run |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    deltas = {p["num_train"]: p for p in paired}
    for e in summary:
        d = deltas.get(e["num_train"])
        delta = (f"{100 * d['delta_mean']:+.2f} ± {100 * d['delta_std']:.2f} ({d['mtan_better']}/{d['seeds']})"
                 if d and e["model"] == "mtan" else "–")
        accs = " | ".join(f"{100 * e[k]:.2f} ± {100 * e[f'{k}_std']:.2f}" for k in (*TASKS, "mean"))
        lines.append(f"| {e['num_train']} | {e['epochs']} ({e['steps']}) | {e['model']} | {params[e['model']]['total']:,} "
                     f"| {accs} | {delta} | {e['train_seconds']:.1f} |")
    return "\n".join(lines)


def params_table(params: dict[str, dict[str, int]]) -> str:
    """Parameter counts by part as a Markdown table."""
    lines = ["| model | trunk (SmallCNN layers) | shared inter-stage f | attention (2 tasks) | heads | total |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, c in params.items():
        lines.append(f"| {model} | {c['trunk']:,} | {c['inter_stage']:,} | {c['attention']:,} | {c['heads']:,} | {c['total']:,} |")
    return "\n".join(lines)


def figure(summary: list[dict[str, Any]], path: str) -> Optional[str]:
    """Bar chart of the mean test accuracy per setting and model (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no figure (pip install "mtl-lightning[plots]").')
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(e["num_train"] for e in summary))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    for i, model in enumerate(MODELS):
        rows = {e["num_train"]: e for e in summary if e["model"] == model}
        xs = [k + (i - 0.5) * width for k in range(len(settings))]
        ax.bar(xs, [100 * rows[s]["mean"] for s in settings], width, yerr=[100 * rows[s]["mean_std"] for s in settings],
               capsize=3, label=model)
    ax.set_xticks(range(len(settings)), [f"{s} train pairs" for s in settings])
    ax.set_ylabel("test accuracy, mean of 2 digits (%)")
    low = min(100 * (e["mean"] - e["mean_std"]) for e in summary)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.legend(loc="lower right")
    ax.set_title("MTAN vs hard sharing on MultiDigits (mean ± std over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the options; ``--quick`` changes the defaults of the options not given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, help=f"seeds 0 … N-1 (default {FULL['seeds']})")
    parser.add_argument("--num-train", type=int, nargs="+", help=f"training pairs, one setting each (default {FULL['num_train']})")
    parser.add_argument("--epochs", type=int, nargs="+",
                        help=f"epochs per setting, one value for all or one per --num-train (default {FULL['epochs']})")
    parser.add_argument("--channels", type=int, nargs=2, metavar=("C1", "C2"), help=f"conv channels (default {FULL['channels']})")
    parser.add_argument("--features", type=int, help=f"trunk output features F (default {FULL['features']})")
    parser.add_argument("--num-test", type=int, help=f"test pairs (default {FULL['num_test']})")
    parser.add_argument("--batch-size", type=int, help=f"training batch size (default {FULL['batch_size']})")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3, as ew.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; results depend on it)")
    parser.add_argument("--out", default="runs/mtan_multidigits", help="folder for results.json and the figure")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds) for tests")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}.")
    for name, values in (("--num-train", args.num_train), ("--epochs", args.epochs), ("--channels", args.channels)):
        bad = [v for v in values if v < 1]
        if bad:
            parser.error(f"{name} values must be >= 1, got {bad}.")
    if len(set(args.num_train)) != len(args.num_train):
        parser.error(f"--num-train values must be distinct, got {args.num_train}.")
    if len(args.epochs) == 1:
        args.epochs = args.epochs * len(args.num_train)
    elif len(args.epochs) != len(args.num_train):
        parser.error(f"--epochs takes one value or one per --num-train setting ({len(args.num_train)}); got {len(args.epochs)}.")
    for name in ("features", "num_test", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} exists and is not a folder.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the comparison, print the tables, write ``results.json`` (and a figure) into ``--out``."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.makedirs(args.out, exist_ok=True)
    try:
        params = {m: parameter_counts(build_module(m, args.channels, args.features, args.lr)) for m in MODELS}
        print(params_table(params) + "\n", flush=True)
        runs: list[dict[str, Any]] = []
        start = time.perf_counter()
        for num_train, epochs in zip(args.num_train, args.epochs):
            for seed in range(args.seeds):
                for model in MODELS:
                    r = train_one(model, seed, num_train, epochs, args)
                    runs.append(r)
                    print(f"{num_train:6d} pairs, {epochs:3d} epochs, seed {seed}, {model:4s}: "
                          + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["test"].items())
                          + f"  [{r['train_seconds']:.1f} s]", flush=True)
        total = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    summary, paired = summarize(runs)
    text = table(summary, paired, params)
    print("\n" + text + f"\n\ntotal {total:.0f} s", flush=True)
    results = {
        "config": {"seeds": list(range(args.seeds)), "num_train": args.num_train, "epochs": args.epochs,
                   "channels": args.channels, "features": args.features, "num_test": args.num_test,
                   "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads, "quick": args.quick,
                   "torch": torch.__version__},
        "parameters": params, "runs": runs, "summary": summary, "paired": paired, "table": text,
        "total_seconds": total,
    }
    results["figure"] = figure(summary, os.path.join(args.out, "mtan_multidigits.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
