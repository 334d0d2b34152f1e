"""mtl-lightning: multi-task learning research on PyTorch Lightning."""

from mtl_lightning.balancing import BalancingMethod, EqualWeighting, LossWeighting, StaticWeighting
from mtl_lightning.data import MultiDigitsDataModule, MultiTaskDataModule
from mtl_lightning.models import MultiTaskModule
from mtl_lightning.tasks import ClassificationTask, MultiLabelTask, RegressionTask, Task

__version__ = "0.1.0"
__all__ = [
    "MultiTaskModule",
    "MultiTaskDataModule",
    "MultiDigitsDataModule",
    "Task",
    "ClassificationTask",
    "MultiLabelTask",
    "RegressionTask",
    "BalancingMethod",
    "LossWeighting",
    "EqualWeighting",
    "StaticWeighting",
]
