"""Wall-time overhead of NegativeTransferMonitor with its defaults (target: <= 10%).

    PYTHONPATH=$PWD python experiments/benchmarks/monitor_overhead.py [--epochs 5] [--repeats 5] [--threads 1]

Trains MultiDigits (left/right, SmallCNN, batch 128, Adam) with equal weighting, without and with
the monitor (default interval and plotting unless given), after one warm-up fit of each; the
off/on fits are interleaved so that drift in machine speed hits both sides alike. Two numbers:

* the median of the paired on/off ratios of ``trainer.fit`` wall time (what a user sees; noisy
  on a shared machine), with the range over pairs;
* the monitor's own time, timed inside its hooks (measurements, logging, rules, heatmaps, report;
  the first monitored fit of a process also pays matplotlib's import), as a share of the median
  fit without the monitor. It is less sensitive to load, since it does not subtract two noisy fits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import lightning.pytorch as pl
import torch

from mtl_lightning.data import MultiDigitsDataModule
from mtl_lightning.models import MultiTaskModule, SmallCNN
from mtl_lightning.monitoring import NegativeTransferMonitor
from mtl_lightning.tasks import ClassificationTask


class TimedMonitor(NegativeTransferMonitor):
    """The monitor, with the time spent in each of its training hooks added up."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds = {"measure": 0.0, "batch_end": 0.0, "epoch_end": 0.0, "train_end": 0.0}

    @contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start

    def measure(self, *args, **kwargs):
        with self._timed("measure"):
            return super().measure(*args, **kwargs)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        with self._timed("batch_end"):
            super().on_train_batch_end(*args, **kwargs)

    def on_train_epoch_end(self, *args, **kwargs) -> None:
        with self._timed("epoch_end"):
            super().on_train_epoch_end(*args, **kwargs)

    def on_train_end(self, *args, **kwargs) -> None:
        with self._timed("train_end"):
            super().on_train_end(*args, **kwargs)


def fit_seconds(monitor_kwargs: dict | None, epochs: int, num_train: int) -> tuple[float, TimedMonitor | None]:
    pl.seed_everything(0, verbose=False)
    dm = MultiDigitsDataModule(num_train=num_train, num_val=500, num_test=100)
    model = MultiTaskModule(SmallCNN(), [ClassificationTask("left", 10), ClassificationTask("right", 10)],
                            optimizer=partial(torch.optim.Adam, lr=2e-3))
    monitor = None if monitor_kwargs is None else TimedMonitor(output_dir="runs/overhead", **monitor_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[monitor] if monitor else [])
    start = time.perf_counter()
    trainer.fit(model, dm)
    return time.perf_counter() - start, monitor


def main() -> None:
    defaults = NegativeTransferMonitor()
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=int, default=defaults.interval)
    parser.add_argument("--plot-every-n-epochs", type=int, default=defaults.plot_every_n_epochs)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    monitor_kwargs = {"interval": args.interval, "plot_every_n_epochs": args.plot_every_n_epochs}
    fit_seconds(None, 1, args.num_train)  # warm-up: data loading, allocator, thread pools
    fit_seconds(monitor_kwargs, 1, args.num_train)  # warm-up of the monitor's code paths (and matplotlib's import)
    off, on, monitors = [], [], []
    for _ in range(args.repeats):
        off.append(fit_seconds(None, args.epochs, args.num_train)[0])
        seconds, monitor = fit_seconds(monitor_kwargs, args.epochs, args.num_train)
        on.append(seconds)
        monitors.append(monitor)
    ratios = [b / a for a, b in zip(off, on)]
    own = [sum(m.seconds[k] for k in ("batch_end", "epoch_end", "train_end")) for m in monitors]
    median_off = statistics.median(off)
    print(f"\nMultiDigits left/right, SmallCNN, {args.num_train} pairs x {args.epochs} epochs, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved off/on pairs after warm-up fits; monitor interval {args.interval}, "
          f"plot_every_n_epochs {args.plot_every_n_epochs}")
    print("| | fit wall time (s, median) | measurements | overhead, median of paired ratios (range) | monitor's own time (s, median) | own time / fit without |")
    print("|---|---|---|---|---|---|")
    print(f"| off | {median_off:.2f} | 0 | – | – | – |")
    print(f"| on | {statistics.median(on):.2f} | {monitors[0].measurements} | {100 * (statistics.median(ratios) - 1):+.1f}% "
          f"({100 * (min(ratios) - 1):+.1f}% to {100 * (max(ratios) - 1):+.1f}%) | {statistics.median(own):.2f} | "
          f"{100 * statistics.median(own) / median_off:.1f}% |")
    last = monitors[-1].seconds
    print(f"\nLast monitored fit: measurements {last['measure']:.2f} s ({1000 * last['measure'] / max(monitors[-1].measurements, 1):.0f} ms each), "
          f"logging and rules {last['batch_end'] - last['measure']:.2f} s, per-epoch heatmaps {last['epoch_end']:.2f} s, "
          f"final heatmaps and report {last['train_end']:.2f} s.")


if __name__ == "__main__":
    main()
