"""DeepLab's ASPP head (Chen et al., "Rethinking Atrous Convolution", arXiv 1706.05587) as LibMTL's
NYUv2 / Cityscapes benchmarks put one on each task (``examples/nyu/aspp.py`` of
github.com/median-research-group/LibMTL, itself torchvision's ``DeepLabHead``).

The head reads the dilated ResNet's feature map (:class:`~mtl_lightning.models.ResNet` with
``output_stride=8, dense=True``): atrous spatial pyramid pooling — a 1×1 convolution, three 3×3
convolutions dilated 12, 24 and 36, and image pooling (global average, 1×1 convolution, broadcast
back), each 256 channels with BatchNorm and ReLU — concatenated and projected by a 1×1 convolution
to 256 channels (BatchNorm, ReLU, dropout 0.5); then a 3×3 convolution, BatchNorm, ReLU and a 1×1
convolution to the task's channels. The module names are LibMTL's (``0.convs.1.0.weight``, …,
``4.weight``), so its decoders' state dicts load unchanged.

``upsample`` then resizes the output bilinearly by that factor with ``align_corners=True``: LibMTL's
``process_preds``, which interpolates every prediction to the image size (288×384 or 128×256) before
the loss. Set it to the encoder's output stride so the output matches the label maps.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The atrous rates of LibMTL's (and torchvision's) DeepLabHead.
ATROUS_RATES = (12, 24, 36)


class ASPPConv(nn.Sequential):
    """3×3 convolution dilated ``dilation``, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class ASPPPooling(nn.Sequential):
    """Image pooling: global average, 1×1 convolution, BatchNorm, ReLU, resized back to the input's size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, one :class:`ASPPConv` per rate and
    :class:`ASPPPooling`, concatenated and projected (1×1 convolution, BatchNorm, ReLU, dropout)."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int] = ATROUS_RATES, out_channels: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU())]
        branches += [ASPPConv(in_channels, out_channels, int(rate)) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class Upsample(nn.Module):
    """Bilinear resize by an integer ``factor`` (``align_corners=True``, LibMTL's ``process_preds``)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[-2] * self.factor, x.shape[-1] * self.factor)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class DeepLabHead(nn.Sequential):
    """LibMTL's task head for dense prediction: :class:`ASPP`, 3×3 convolution, BatchNorm, ReLU, 1×1
    convolution to ``out_channels``, and the resize by ``upsample``.

    Args:
        in_channels: Channels of the encoder's feature map (2048 for ResNet-50).
        out_channels: The task's channels (13 classes, 1 for depth, 3 for normals).
        atrous_rates: Dilations of the three 3×3 ASPP branches (LibMTL: 12, 24, 36).
        channels: Width of every ASPP branch and of the 3×3 convolution (LibMTL: 256).
        dropout: Dropout after the ASPP projection (LibMTL: 0.5).
        upsample: Factor of the final bilinear resize (the encoder's output stride; 1: none).

    Examples:
        >>> import torch
        >>> head = DeepLabHead(32, 13, channels=8, upsample=8).eval()
        >>> tuple(head(torch.randn(2, 32, 4, 6)).shape)
        (2, 13, 32, 48)
    """

    def __init__(self, in_channels: int, out_channels: int, atrous_rates: Sequence[int] = ATROUS_RATES,
                 channels: int = 256, dropout: float = 0.5, upsample: int = 1) -> None:
        if min(in_channels, out_channels, channels) < 1 or upsample < 1 or not 0 <= dropout < 1:
            raise ValueError(f"DeepLabHead: in_channels, out_channels, channels and upsample must be >= 1 and dropout "
                             f"in [0, 1), got {in_channels}, {out_channels}, {channels}, {upsample} and {dropout}.")
        if not atrous_rates or min(int(r) for r in atrous_rates) < 1:
            raise ValueError(f"DeepLabHead: atrous_rates must be positive dilations, got {list(atrous_rates)}.")
        layers: list[nn.Module] = [ASPP(in_channels, atrous_rates, channels, dropout),
                                   nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(), nn.Conv2d(channels, out_channels, 1)]
        if upsample > 1:
            layers.append(Upsample(upsample))
        super().__init__(*layers)
        self.in_channels, self.out_channels, self.upsample = in_channels, out_channels, upsample


__all__ = ["DeepLabHead", "ASPP", "ASPPConv", "ASPPPooling", "Upsample", "ATROUS_RATES"]
