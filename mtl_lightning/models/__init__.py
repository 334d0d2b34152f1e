"""Models: the multi-task LightningModule and the encoders it shares between tasks."""

from mtl_lightning.architectures import CrossStitch, SegNet, SoftSharing
from mtl_lightning.models.deeplab import DeepLabHead
from mtl_lightning.models.encoders import MLP, SmallCNN
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.models.resnet import ResNet
from mtl_lightning.models.timm_encoder import TimmEncoder
from mtl_lightning.models.transformer import TransformerEncoder

__all__ = ["MultiTaskModule", "MLP", "SmallCNN", "ResNet", "SegNet", "SoftSharing", "CrossStitch", "TransformerEncoder",
           "TimmEncoder", "DeepLabHead"]
