"""Callbacks that inject faults into a run (used by test_fault_injection, also in its subprocesses)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _stop_requested(trainer: Trainer) -> bool:
    return trainer.received_sigterm or any(getattr(cb, "signal_name", None) for cb in trainer.callbacks)


class PauseAtStep(Callback):
    """After optimizer step ``step``, write ``marker`` and wait (at most ``timeout`` seconds) until the
    run is told to stop: the test then signals or kills a run that is known to be mid-training."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not _stop_requested(trainer) and time.monotonic() < deadline:
            time.sleep(0.01)


class SignalAtBatch(Callback):
    """Send ``signum`` to this very process at the end of training batch ``batch_idx`` of epoch 0."""

    def __init__(self, batch_idx: int, signum: int = int(signal.SIGTERM)) -> None:
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            if signal.getsignal(self.signum) in (signal.SIG_DFL, None):  # it would kill the test process
                raise AssertionError(f"no handler for signal {self.signum}")
            os.kill(os.getpid(), self.signum)


class NaNLoss(Callback):
    """From optimizer step ``step`` on, task ``task``'s training loss is NaN. On the exception that
    follows, the model's weights are written to ``dump`` (to check them)."""

    def __init__(self, task: str, step: int, dump: Optional[str] = None) -> None:
        self.task, self.step, self.dump = task, step, dump

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        task = pl_module.tasks[self.task]
        if trainer.global_step == self.step and "loss" not in vars(task):
            loss = task.loss
            task.loss = lambda output, target: loss(output, target) * float("nan")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.dump:
            torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.dump)


class NaNWeights(Callback):
    """After optimizer step ``step``, one weight of task ``task``'s head becomes NaN (before the
    step's checkpoint is written: ModelCheckpoint runs after every other callback)."""

    def __init__(self, task: str, step: int) -> None:
        self.task, self.step = task, step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.heads[self.task].parameters()).view(-1)[0] = float("nan")


class Snapshot(Callback):
    """Keeps a copy of the model's weights after each optimizer step (``SNAPSHOTS[step]``)."""

    SNAPSHOTS: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.SNAPSHOTS[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
