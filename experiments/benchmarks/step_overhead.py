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

Both also run a third reference, **Lightning, hand-written**: the same hand-written step through
Lightning's manual-optimization API (``manual_backward``, the ``LightningOptimizer`` step and
``zero_grad``), and for the epoch a minimal ``LightningModule`` whose ``training_step`` is that
step, under the same ``Trainer``. It is the cost of any step that goes through Lightning's hooks,
precision plugin and loop; the module's ratio to it is the framework's own overhead.
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


def lightning_hand_step(module: pl.LightningModule, encoder: torch.nn.Module, heads: torch.nn.ModuleDict,
                        names: list[str], batch: dict) -> None:
    """The hand-written step through Lightning's manual optimization (hooks, precision plugin, strategy)."""
    optimizer = module.optimizers()
    z = encoder(batch["input"])
    loss = sum(F.cross_entropy(heads[t](z), batch[t]) for t in names)
    module.manual_backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class HandLightningModule(pl.LightningModule):
    """A minimal LightningModule: the benchmark's model and the hand-written step, nothing else."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        reference, self.names = build(num_tasks)  # the same initial weights as the module's
        self.encoder, self.heads = reference.encoder, reference.heads
        self.automatic_optimization = False

    def training_step(self, batch: dict, batch_idx: int) -> None:
        lightning_hand_step(self, self.encoder, self.heads, self.names, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def step_times(num_tasks: int, rounds: int, inner: int) -> dict[str, float]:
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
    lightning = lambda: lightning_hand_step(module, module.encoder, module.heads, names, batch)  # noqa: E731
    return interleaved({"ours": framework, "pytorch": baseline, "lightning": lightning}, rounds, inner)


def interleaved(candidates: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median step time of each candidate and median per-round ratio of ``ours`` to each other one,
    the candidates run in turn within every round (one untimed call, then ``inner`` timed ones)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            fn()
            times[name].append(timed(fn, inner))
    result = {name: statistics.median(values) for name, values in times.items()}
    for name in candidates:
        if name != "ours":
            result[f"ratio_{name}"] = statistics.median(a / b for a, b in zip(times["ours"], times[name]))
    return result


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def fit_epoch_times(module: pl.LightningModule, loader: DataLoader, epochs: int) -> list[float]:
    """The times of ``epochs + 1`` training epochs of ``Trainer.fit`` (the first is a warm-up)."""
    timer = _EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs + 1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1, limit_val_batches=0,
                         callbacks=[timer])
    trainer.fit(module, loader)
    return timer.times


def epoch_times(num_tasks: int, epochs: int, batches: int) -> dict[str, float]:
    module, names = build(num_tasks)
    loader = DataLoader(data(names, batches), batch_size=128, shuffle=True, collate_fn=collate_batched,
                        generator=torch.Generator().manual_seed(0))
    ours = fit_epoch_times(module, loader, epochs)
    lightning = fit_epoch_times(HandLightningModule(num_tasks), loader, epochs)
    hand, _ = build(num_tasks)
    optimizer = torch.optim.Adam(hand.parameters(), lr=1e-4)
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        for batch in loader:
            hand_step(hand, optimizer, names, batch)
        times.append(time.perf_counter() - start)
    result = {"ours": statistics.median(ours[1:]), "pytorch": statistics.median(times[1:]),
              "lightning": statistics.median(lightning[1:])}
    result["ratio_pytorch"] = result["ours"] / result["pytorch"]
    result["ratio_lightning"] = result["ours"] / result["lightning"]
    return result


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
    step = step_times(args.tasks, args.rounds, args.inner)
    epoch = epoch_times(args.tasks, args.epochs, args.batches)
    print(f"| T = {args.tasks} | mtl-lightning | Lightning, hand-written | plain PyTorch "
          "| × Lightning, hand-written | × plain PyTorch (target ≤ 1.05) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row, unit, scale in ((" EW step", step, "ms", 1e3), (f" fit epoch ({args.batches} steps)", epoch, "s", 1)):
        print(f"|{label} | {row['ours'] * scale:.3f} {unit} | {row['lightning'] * scale:.3f} {unit} "
              f"| {row['pytorch'] * scale:.3f} {unit} | {row['ratio_lightning']:.3f} | {row['ratio_pytorch']:.3f} |")


if __name__ == "__main__":
    main()
