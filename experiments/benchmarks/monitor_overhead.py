"""Wall-time overhead of NegativeTransferMonitor at its default interval (target: <= 10%).

    python experiments/benchmarks/monitor_overhead.py [--epochs 3] [--repeats 3] [--interval 25]

Trains MultiDigits (left/right, SmallCNN, batch 128) with equal weighting, with and without the
monitor (interleaved, after a warm-up fit), and prints the median wall time of ``trainer.fit`` and
the median of the paired on/off ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch

from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.models import MultiTaskModule, SmallCNN
from mtl_lightning.monitoring import NegativeTransferMonitor
from mtl_lightning.tasks import ClassificationTask


def fit_seconds(monitor: bool, epochs: int, interval: int, num_train: int) -> tuple[float, int]:
    pl.seed_everything(0)
    dm = MultiDigitsDataModule(num_train=num_train, num_val=500, num_test=100)
    model = MultiTaskModule(SmallCNN(), [ClassificationTask("left", 10), ClassificationTask("right", 10)],
                            optimizer=partial(torch.optim.Adam, lr=2e-3))
    callbacks = [NegativeTransferMonitor(interval=interval, plot_every_n_epochs=0, output_dir="runs/overhead")] if monitor else []
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    return seconds, callbacks[0].measurements if monitor else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=int, default=NegativeTransferMonitor().interval)
    parser.add_argument("--num-train", type=int, default=10000)
    args = parser.parse_args()
    fit_seconds(False, 1, args.interval, args.num_train)  # warm-up: data loading, allocator, thread pools
    off, on, measurements = [], [], 0
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both sides alike
        off.append(fit_seconds(False, args.epochs, args.interval, args.num_train)[0])
        seconds, measurements = fit_seconds(True, args.epochs, args.interval, args.num_train)
        on.append(seconds)
    ratio = statistics.median(b / a for a, b in zip(off, on))
    print(f"\nMultiDigits left/right, SmallCNN, {args.num_train} pairs x {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved pairs after a warm-up fit")
    print(f"| monitor (interval {args.interval}) | median fit wall time (s) | measurements | overhead (median of paired ratios) |")
    print("|---|---|---|---|")
    print(f"| off | {statistics.median(off):.2f} | 0 | – |")
    print(f"| on | {statistics.median(on):.2f} | {measurements} | {100 * (ratio - 1):+.1f}% |")


if __name__ == "__main__":
    main()
