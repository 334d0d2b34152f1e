"""The framework's fixed cost per step and per epoch, against plain PyTorch on the same model and data.

    python experiments/benchmarks/step_overhead.py [--tasks 2] [--rounds 15] [--inner 5] [--threads 2]

Workload: the gradient benchmark's (batch 128 × 256 features, MLP 256→512→512→512, T heads
Linear(512→10), cross-entropy), Adam, float32, CPU.

* **step**: ``MultiTaskModule``'s training step with equal weighting (the module's losses, the core
  :class:`~mtl_lightning.core.MultiTaskStep`, the Lightning backend: ``manual_backward``, the
  ``LightningOptimizer`` step) on a module a real ``Trainer`` has set up, without the logging of
  ``training_step``, versus a hand-written step on the same modules (forward, Σ cross-entropy,
  ``backward``, ``step``, ``zero_grad``). Rounds interleave the two; the ratio is the median over
  rounds.
* **epoch**: a whole ``Trainer.fit`` epoch (logging on, no progress bar, checkpointing or
  validation) versus a hand-written loop over the same DataLoader; the first epoch of each is a
  warm-up, the ratio is of the medians of the next epochs' times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mtl_lightning.balancing import EqualWeighting
from mtl_lightning.data import TensorDictDataset
from mtl_lightning.data.datamodule import collate_batched
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import ClassificationTask


def build(num_tasks: int) -> tuple[MultiTaskModule, list[str]]:
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(num_tasks)]
    module = MultiTaskModule(MLP(256, (512, 512, 512)), [ClassificationTask(name=n, num_classes=10) for n in names],
                             optimizer=partial(torch.optim.Adam, lr=1e-4))
    return module, names


def data(names: list[str], batches: int) -> TensorDictDataset:
    g = torch.Generator().manual_seed(0)
    n = 128 * batches
    return TensorDictDataset({"input": torch.randn(n, 256, generator=g),
                              **{t: torch.randint(10, (n,), generator=g) for t in names}})


def hand_step(module: MultiTaskModule, optimizer: torch.optim.Optimizer, names: list[str], batch: dict) -> None:
    z = module.encoder(batch["input"])
    loss = sum(F.cross_entropy(module.heads[t](z), batch[t]) for t in names)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def step_ratio(num_tasks: int, rounds: int, inner: int) -> tuple[float, float, float]:
    module, names = build(num_tasks)
    dataset = data(names, 1)
    batch = collate_batched([dataset[i] for i in range(128)])
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader([batch], batch_size=None))  # sets up strategy, precision, optimizer
    balancer = EqualWeighting()
    balancer.setup(trainer, module, "fit")
    plain = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    framework = lambda: module._step(batch, balancer)  # noqa: E731
    baseline = lambda: hand_step(module, plain, names, batch)  # noqa: E731
    ours, theirs, ratios = [], [], []
    for _ in range(rounds):
        framework(), baseline()
        a, b = timed(framework, inner), timed(baseline, inner)
        ours.append(a), theirs.append(b), ratios.append(a / b)
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def epoch_ratio(num_tasks: int, epochs: int, batches: int) -> tuple[float, float, float]:
    module, names = build(num_tasks)
    loader = DataLoader(data(names, batches), batch_size=128, shuffle=True, collate_fn=collate_batched,
                        generator=torch.Generator().manual_seed(0))
    timer = _EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs + 1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1, limit_val_batches=0,
                         callbacks=[timer])
    trainer.fit(module, loader)
    hand, _ = build(num_tasks)
    optimizer = torch.optim.Adam(hand.parameters(), lr=1e-4)
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        for batch in loader:
            hand_step(hand, optimizer, names, batch)
        times.append(time.perf_counter() - start)
    ours, theirs = statistics.median(timer.times[1:]), statistics.median(times[1:])
    return ours, theirs, ours / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step = step_ratio(args.tasks, args.rounds, args.inner)
    epoch = epoch_ratio(args.tasks, args.epochs, args.batches)
    print(f"| T = {args.tasks} | mtl-lightning | plain PyTorch | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    print(f"| EW step | {step[0] * 1e3:.2f} ms | {step[1] * 1e3:.2f} ms | {step[2]:.3f} | ≤ 1.05 |")
    print(f"| fit epoch ({args.batches} steps) | {epoch[0]:.3f} s | {epoch[1]:.3f} s | {epoch[2]:.3f} | ≤ 1.05 |")


if __name__ == "__main__":
    main()
