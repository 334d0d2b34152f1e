"""SegNet-MTAN: a shared SegNet with task attention on every encoder and decoder level (Liu et al.,
"End-to-End Multi-Task Learning with Attention", CVPR 2019, arXiv 1803.10704), the model of the
NYUv2 / Cityscapes results of MTAN, CAGrad, Nash-MTL and FAMO."""

from __future__ import annotations

from typing import Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, parameters_of
from mtl_lightning.architectures.segnet import SEGNET_FILTERS, SegNet, conv_bn_relu, init_segnet_weights


def attention_layer(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """MTAN's attention module: 1×1 conv-BN-ReLU, 1×1 conv-BN, sigmoid (a mask in (0, 1))."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 1), nn.BatchNorm2d(out_channels), nn.Sigmoid(),
    )


class SegNetMTAN(Architecture):
    """A shared :class:`~mtl_lightning.models.segnet.SegNet`; each task attends to every level.

    On encoder level j, task t's mask a = att_t^j([u_j, ĝ_{j−1}]) selects from the level's features
    p_j, and a shared conv block carries a ⊙ p_j to the next level (ĝ_j, max-pooled); the decoder
    mirrors it on the unpooled and decoded features. The task's features are its attended last
    decoder output ``(N, filters[0], H, W)``.

    Roles: the SegNet and the attention blocks' shared convolutions (``encoder_block_att``,
    ``decoder_block_att``) are shared; each task's attention modules are its own. (The Nash-MTL code
    hands the attention modules to the gradient methods as shared parameters; their gradients come
    from one task only, so here they are task-own and get that task's gradient directly.) There is
    no single shared representation: gradient methods run in ``param`` mode.

    Args:
        filters: Channels of each level; the last two must be equal, as in the paper's
            ``(64, 128, 256, 512, 512)``.
        in_channels: Channels of the input image.

    Examples:
        >>> import torch
        >>> from mtl_lightning import MultiTaskModule
        >>> from mtl_lightning.tasks import DepthTask, SegmentationTask
        >>> model = MultiTaskModule(SegNetMTAN(filters=(4, 8, 8)), [SegmentationTask("seg", num_classes=5), DepthTask("depth")])
        >>> out = model(torch.randn(2, 3, 16, 24))
        >>> {t: tuple(o.shape) for t, o in out.items()}
        {'seg': (2, 5, 16, 24), 'depth': (2, 1, 16, 24)}
    """

    def __init__(self, filters: Sequence[int] = SEGNET_FILTERS, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = SegNet(filters, in_channels)
        f = self.backbone.filters
        if f[-1] != f[-2]:
            raise ValueError(f"SegNetMTAN: the last two levels need equal filters (the decoder's first attention reads "
                             f"both), got {list(filters)}.")
        levels = len(f)
        self.filters = f
        self.out_features = f[0]
        self.encoder_block_att = nn.ModuleList(
            [conv_bn_relu(f[0], f[1])] + [conv_bn_relu(f[j], f[j + 1]) for j in range(1, levels - 1)] + [conv_bn_relu(f[-1], f[-1])]
        )
        self.decoder_block_att = nn.ModuleList(
            [conv_bn_relu(f[0], f[0])] + [conv_bn_relu(f[j], f[j - 1]) for j in range(1, levels - 1)] + [conv_bn_relu(f[-1], f[-1])]
        )
        init_segnet_weights(self)

    def build(self, task_names: list[str]) -> None:
        f = self.filters
        self.encoder_att = nn.ModuleDict({
            name: nn.ModuleList([attention_layer(f[0], f[0], f[0])]
                                + [attention_layer(2 * f[j + 1], f[j + 1], f[j + 1]) for j in range(len(f) - 1)])
            for name in task_names
        })
        self.decoder_att = nn.ModuleDict({
            name: nn.ModuleList([attention_layer(2 * f[0], f[0], f[0])]
                                + [attention_layer(f[j + 1] + f[j], f[j], f[j]) for j in range(len(f) - 1)])
            for name in task_names
        })
        init_segnet_weights(self.encoder_att)
        init_segnet_weights(self.decoder_att)

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(
            shared=parameters_of(self.backbone, self.encoder_block_att, self.decoder_block_att),
            task_own={name: parameters_of(self.encoder_att[name], self.decoder_att[name]) for name in self.task_names},
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        enc_u, enc_p, unpooled, decoded = self.backbone.levels(x)
        levels = len(self.filters)
        features = {}
        for name in self.task_names:
            enc_att = cast(nn.ModuleList, self.encoder_att[name])
            dec_att = cast(nn.ModuleList, self.decoder_att[name])
            carried: Optional[Tensor] = None
            for j in range(levels):
                source = enc_u[j] if carried is None else torch.cat([enc_u[j], carried], dim=1)
                carried = F.max_pool2d(self.encoder_block_att[j](enc_att[j](source) * enc_p[j]), kernel_size=2, stride=2)
            assert carried is not None  # levels >= 2 (checked in __init__)
            for i in range(levels):
                level = levels - 1 - i
                up = F.interpolate(carried, scale_factor=2, mode="bilinear", align_corners=True)
                up = self.decoder_block_att[level](up)
                carried = dec_att[level](torch.cat([unpooled[i], up], dim=1)) * decoded[i]
            features[name] = carried
        return features
