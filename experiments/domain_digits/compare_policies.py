"""Train DomainDigits once per mixing-policy config and print validation accuracy per domain.

    PYTHONPATH=$PWD python experiments/domain_digits/compare_policies.py [--epochs 5] [config names…]
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from mtl_lightning.cli import MTLCLI

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = ("original", "transposed", "inverted")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("names", nargs="*", help="config names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.names or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(HERE, "*.yaml")))
    rows = []
    for name in names:
        start = time.perf_counter()
        cli = MTLCLI(args=[
            "fit", "--config", os.path.join(HERE, f"{name}.yaml"), "--trainer.max_epochs", str(args.epochs),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
        ], run_summary=False)  # the table below is the summary
        metrics = cli.trainer.callback_metrics
        acc = [float(metrics[f"val/{d}/accuracy"]) for d in DOMAINS]
        share = [float(metrics[f"train/{d}/step_share"]) for d in DOMAINS]
        rows.append((name, cli.trainer.global_step, acc, share, time.perf_counter() - start))
    print("\n| policy | steps | " + " | ".join(f"val acc {d}" for d in DOMAINS) + " | mean | step share (last epoch) | s |")
    print("|---|---:|" + "---:|" * len(DOMAINS) + "---:|---|---:|")
    for name, steps, acc, share, secs in rows:
        print(f"| {name} | {steps} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {sum(acc) / 3:.3f} | "
              + " / ".join(f"{s:.2f}" for s in share) + f" | {secs:.0f} |")


if __name__ == "__main__":
    main()
