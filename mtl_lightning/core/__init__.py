"""The Lightning-free core of a multi-task training step.

:class:`MultiTaskStep` runs one micro-batch: task losses → balancing method → parameter gradients →
optimizer step. It talks to the training loop through a small :class:`StepBackend` (backward,
no-sync, rank mean, loss scale, optimizer step): the LightningModule, the two-objective toy and the
benchmark scripts all run the same step over their own backend.
"""

from mtl_lightning.core.backend import StepBackend, TorchBackend
from mtl_lightning.core.context import BalancingContext, MultiTaskModel
from mtl_lightning.core.step import MultiTaskStep, StepResult

__all__ = ["BalancingContext", "MultiTaskModel", "MultiTaskStep", "StepBackend", "StepResult", "TorchBackend"]
