"""Task definitions: what each task predicts, how it is scored, where its label lives."""

from mtl_lightning.tasks.dense import DenseTask, DepthTask, NormalTask, SegmentationTask
from mtl_lightning.tasks.task import (
    ClassificationTask,
    MetricSpec,
    MultiLabelTask,
    RegressionTask,
    Task,
    TaskConfigError,
)
from mtl_lightning.tasks.token import TokenClassificationTask

__all__ = [
    "Task", "ClassificationTask", "MultiLabelTask", "RegressionTask", "MetricSpec", "TaskConfigError",
    "DenseTask", "SegmentationTask", "DepthTask", "NormalTask",
    "TokenClassificationTask",
]
