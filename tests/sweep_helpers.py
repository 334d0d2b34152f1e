"""A callback for the SLURM (submitit) preemption test: the first attempt of a run pauses after a
few optimizer steps, tells the test it is waiting, and waits for the preemption signal."""

from __future__ import annotations

import os
import time
from typing import Any

from lightning.pytorch import Callback


class PauseForPreemption(Callback):
    """On the first attempt (not resumed), pause at ``step`` until a signal ends the process."""

    def __init__(self, step: int = 2, marker: str = "paused", timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.ckpt_path is None and trainer.global_step == self.step:
            with open(os.path.join(trainer.log_dir or ".", self.marker), "w") as f:
                f.write(str(os.getpid()))
            deadline = time.time() + self.timeout
            while time.time() < deadline:  # the signal handler runs here, saves and requeues
                time.sleep(0.05)
            raise RuntimeError("no preemption signal arrived")
