"""QM9 on a reduced budget: EW and other methods on a subset, fixed seeds, CPU-sized.

    python experiments/qm9/reduced_budget.py [--methods ew uw famo nash_mtl] [--num-train 2000]
        [--epochs 5] [--out runs/qm9_reduced]

Each method trains the shipped configuration (experiments/qm9/ew.yaml + <method>.yaml: the MPNN,
Nash-MTL's optimiser and scheduler, batch 120, seed 42, their seeded split) with the training split
cut to ``--num-train`` molecules, validation to ``--num-val``, test to ``--num-test`` and
``--epochs`` epochs; the test set is evaluated at the epoch of best validation Δm (Nash-MTL's
selection). Nash-MTL and IMTL-G run in ``mode: rep`` here (gradients w.r.t. the shared
representation; their QM9 runs use the shared parameters, 11 encoder backwards per step). Prints
a Markdown table of the per-target test MAE (meV for energies) and Δm% against the STL baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mtl_lightning.cli import MTLCLI  # noqa: E402
from mtl_lightning.data.qm9 import NASH_MTL_TARGETS, STL_BASELINES  # noqa: E402

HERE = ROOT / "experiments" / "qm9"
CHECKPOINT = (
    "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {monitor: val/delta_m, mode: min, filename: \"best-{epoch}\", save_last: false}\n"
)
#: Method → extra callback (YAML) merged on top of ew.yaml.
METHODS = {
    "ew": "",
    "uw": "    - class_path: mtl_lightning.balancing.UW\n      init_args: {init_log_variance: 0.0, lr: 0.025}\n",
    "famo": "    - class_path: mtl_lightning.balancing.FAMO\n      init_args: {gamma: 0.001, lr: 0.025}\n",
    "nash_mtl": "    - class_path: mtl_lightning.gradients.NashMTL\n"
                "      init_args: {max_norm: 1.0, iterations: 20, update_every: 1, mode: rep}\n",
    "imtl_g": "    - class_path: mtl_lightning.gradients.IMTLG\n      init_args: {mode: rep}\n",
}
UNITS = {"mu": "D", "alpha": "a0³", "homo": "meV", "lumo": "meV", "r2": "a0²", "zpve": "meV",
         "U0": "meV", "U": "meV", "H": "meV", "G": "meV", "cv": "cal/mol/K"}


def run_method(method: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / method
    out.mkdir(parents=True, exist_ok=True)
    override = out / "override.yaml"
    override.write_text("trainer:\n  callbacks:\n" + CHECKPOINT + METHODS[method])
    cli_args = [
        "--config", str(HERE / "ew.yaml"), "--config", str(override),
        "--seed_everything", str(args.seed),
        "--trainer.max_epochs", str(args.epochs), "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.default_root_dir", str(out),
        "--data.init_args.num_train", str(args.num_train),
        "--data.init_args.subset_val", str(args.num_val), "--data.init_args.subset_test", str(args.num_test),
    ]
    start = time.time()
    cli = MTLCLI(args=cli_args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.time() - start
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]
    row = {"method": method, "fit_seconds": round(fit_s, 1), "seconds": round(time.time() - start, 1),
           "best": os.path.basename(cli.trainer.checkpoint_callback.best_model_path),
           "mae": {t: float(result[f"test/{t}/mae"]) for t in NASH_MTL_TARGETS},
           "delta_m": float(result["test/delta_m"])}
    (out / "result.json").write_text(json.dumps(row, indent=1))
    return row


def markdown(rows: list[dict]) -> str:
    head = "| method | " + " | ".join(f"{t} ({UNITS[t]})" for t in NASH_MTL_TARGETS) + " | Δm% ↓ | time (s) |"
    sep = "|" + "---|" * (len(NASH_MTL_TARGETS) + 3)
    lines = [head, sep, "| STL (Nash-MTL paper, full budget) | " + " | ".join(f"{STL_BASELINES[t]:g}" for t in NASH_MTL_TARGETS) + " | 0 | |"]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{row['mae'][t]:.4g}" for t in NASH_MTL_TARGETS)
                     + f" | {row['delta_m']:.1f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ew", "uw", "famo", "nash_mtl"], choices=list(METHODS))
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/qm9_reduced")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = []
    for method in args.methods:
        pl.seed_everything(args.seed)
        rows.append(run_method(method, args))
        print(f"[{method}] done in {rows[-1]['seconds']:.0f} s, test Δm {rows[-1]['delta_m']:.1f}%", flush=True)
    print(f"\nQM9 reduced budget: {args.num_train} train / {args.num_val} val / {args.num_test} test molecules, "
          f"{args.epochs} epochs, seed {args.seed}; test MAE at the best-validation-Δm epoch\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
