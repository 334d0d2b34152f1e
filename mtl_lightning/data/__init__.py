"""Data modules: where batches come from and how tasks are mixed into steps."""

from mtl_lightning.data.celeba import CelebADataModule
from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset
from mtl_lightning.data.dense import CityscapesDataModule, DenseNpyDataModule, NYUv2DataModule
from mtl_lightning.data.domain_digits import DomainDigitsDataModule
from mtl_lightning.data.jokes import JokesDataModule
from mtl_lightning.data.mixing import MultiDatasetDataModule, TaskMixingSampler
from mtl_lightning.data.multidigits import MultiDigitsDataModule
from mtl_lightning.data.office import Office31DataModule, OfficeDataModule, OfficeHomeDataModule
from mtl_lightning.data.planted import PlantedGroupsDataModule
from mtl_lightning.data.policies import (
    AllTasks,
    Annealed,
    Explicit,
    MixingPolicy,
    Proportional,
    RoundRobin,
    Scheduled,
    Temperature,
    Uniform,
)
from mtl_lightning.data.synthetic import CorrelatedRegressionDataModule

__all__ = [
    "MultiTaskDataModule",
    "TensorDictDataset",
    "MultiDigitsDataModule",
    "CorrelatedRegressionDataModule",
    "PlantedGroupsDataModule",
    "MultiDatasetDataModule",
    "TaskMixingSampler",
    "DomainDigitsDataModule",
    "JokesDataModule",
    "DenseNpyDataModule",
    "NYUv2DataModule",
    "CityscapesDataModule",
    "CelebADataModule",
    "OfficeDataModule",
    "Office31DataModule",
    "OfficeHomeDataModule",
    "MixingPolicy",
    "AllTasks",
    "Uniform",
    "Proportional",
    "Temperature",
    "Annealed",
    "RoundRobin",
    "Explicit",
    "Scheduled",
]
