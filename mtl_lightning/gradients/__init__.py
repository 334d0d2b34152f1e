"""Per-task gradients: the shared Jacobian engine and the gradient balancing methods built on it.

Every method is a Lightning callback (configure one under ``trainer.callbacks``)."""

from mtl_lightning.gradients.aligned_mtl import AlignedMTL
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.cagrad import CAGrad
from mtl_lightning.gradients.config import ConFIG
from mtl_lightning.gradients.cr_mogm import CRMOGM
from mtl_lightning.gradients.db_mtl import DBMTL
from mtl_lightning.gradients.dualproj import DualProj
from mtl_lightning.gradients.excess_mtl import ExcessMTL
from mtl_lightning.core.engine import (
    EmbeddingLookups,
    combine,
    flatten_jacobian,
    gramian,
    per_task_gradients,
    per_task_gramian,
    representation_backward,
    streamed_gramian,
    task_jacobian,
    unflatten_into,
)
from mtl_lightning.gradients.fairgrad import FairGrad
from mtl_lightning.gradients.graddrop import GradDrop
from mtl_lightning.gradients.gradvac import GradVac
from mtl_lightning.gradients.imtl_g import IMTLG
from mtl_lightning.gradients.mconfig import MConFIG
from mtl_lightning.gradients.mgda import MGDA
from mtl_lightning.gradients.moco import MoCo
from mtl_lightning.gradients.modo import MoDo
from mtl_lightning.gradients.nash_mtl import NashMTL
from mtl_lightning.gradients.pcgrad import PCGrad
from mtl_lightning.gradients.sdmgrad import SDMGrad
from mtl_lightning.gradients.torchjd_adapter import TorchJDWeighting
from mtl_lightning.gradients.upgrad import UPGrad

__all__ = [
    "task_jacobian", "flatten_jacobian", "unflatten_into", "gramian", "combine", "per_task_gradients",
    "representation_backward", "per_task_gramian", "streamed_gramian", "EmbeddingLookups",
    "GradientBalancer", "MGDA", "PCGrad", "GradVac", "GradDrop", "CAGrad", "NashMTL", "IMTLG", "AlignedMTL",
    "UPGrad", "DBMTL", "FairGrad", "DualProj", "ConFIG", "SDMGrad", "CRMOGM", "ExcessMTL", "MConFIG", "MoCo", "MoDo",
    "TorchJDWeighting",
]
