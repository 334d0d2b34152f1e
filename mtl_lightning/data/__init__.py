"""Data modules: where batches come from and how tasks are mixed into steps."""

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset
from mtl_lightning.data.multidigits import MultiDigitsDataModule
from mtl_lightning.data.planted import PlantedGroupsDataModule
from mtl_lightning.data.synthetic import CorrelatedRegressionDataModule

__all__ = [
    "MultiTaskDataModule",
    "TensorDictDataset",
    "MultiDigitsDataModule",
    "CorrelatedRegressionDataModule",
    "PlantedGroupsDataModule",
]
