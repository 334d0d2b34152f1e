"""Sharing architectures: which parameters the tasks share, declared in one place.

Give one as ``model.encoder`` (a plain ``nn.Module`` means :class:`HardSharing`); the model passes
its task names to it. See :mod:`mtl_lightning.architectures.base` for the protocol and the roles.
"""

from mtl_lightning.architectures.base import Architecture, ParameterRoles
from mtl_lightning.architectures.hard_sharing import HardSharing
from mtl_lightning.architectures.cgc import CGC
from mtl_lightning.architectures.cross_stitch import CrossStitch
from mtl_lightning.architectures.dselect_k import DSelectK
from mtl_lightning.architectures.mmoe import MMoE
from mtl_lightning.architectures.lora import PerTaskLoRA
from mtl_lightning.architectures.mtan import MTAN
from mtl_lightning.architectures.ple import PLE
from mtl_lightning.architectures.segnet import SegNet
from mtl_lightning.architectures.segnet_mtan import SegNetMTAN
from mtl_lightning.architectures.soft_sharing import SoftSharing
from mtl_lightning.architectures.task_graph import TaskGraph
from mtl_lightning.architectures.verify import check_roles

__all__ = [
    "Architecture", "ParameterRoles", "HardSharing", "SoftSharing", "CrossStitch", "MTAN", "MMoE", "CGC", "PLE",
    "DSelectK", "TaskGraph", "PerTaskLoRA", "SegNet", "SegNetMTAN", "check_roles",
]
