"""SegNet (Badrinarayanan et al., TPAMI 2017) as the MTAN paper builds it for NYUv2 and Cityscapes
(Liu et al., CVPR 2019, arXiv 1803.10704; ``SegNetSplit`` / ``SegNetMtan`` in
``experiments/nyuv2/models.py`` of github.com/AvivNavon/nash-mtl): an encoder of ``len(filters)``
levels (conv-BN-ReLU blocks, 2×2 max-pooling with indices) and a mirrored decoder (max-unpooling
with those indices).

Used as a plain encoder, :class:`SegNet` is the "split" (hard-sharing) baseline: the whole
encoder-decoder is shared and each task's head (a 3×3 and a 1×1 convolution, the dense tasks'
default) reads its last features. :class:`~mtl_lightning.architectures.SegNetMTAN` adds MTAN's task
attention on every level.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

#: The filters of the MTAN / Nash-MTL / FAMO SegNet.
SEGNET_FILTERS = (64, 128, 256, 512, 512)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 convolution, batch norm, ReLU (MTAN's ``conv_layer``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def init_segnet_weights(module: nn.Module) -> None:
    """MTAN's initialisation: Xavier-normal convolution and linear weights, zero biases, unit BN scale."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:  # bias=False layers have none
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class SegNet(nn.Module):
    """The shared SegNet encoder-decoder; ``forward`` returns the last decoder features
    ``(N, filters[0], H, W)`` (``out_features = filters[0]``).

    The input's height and width must be divisible by ``2 ** len(filters)`` (288×384 and 128×256
    are, with the 5 levels of the paper).

    Args:
        filters: Channels of each level (the paper's ``(64, 128, 256, 512, 512)``; fewer or narrower
            levels make a small model for tests).
        in_channels: Channels of the input image.

    Examples:
        >>> import torch
        >>> net = SegNet(filters=(4, 8, 8))
        >>> tuple(net(torch.randn(2, 3, 16, 24)).shape)
        (2, 4, 16, 24)
    """

    def __init__(self, filters: Sequence[int] = SEGNET_FILTERS, in_channels: int = 3) -> None:
        super().__init__()
        f = [int(c) for c in filters]
        if len(f) < 2 or min(f) < 1:
            raise ValueError(f"SegNet: filters needs at least 2 positive channel counts, got {list(filters)}.")
        levels = len(f)
        self.filters = f
        self.out_features = f[0]
        self.encoder_block = nn.ModuleList([conv_bn_relu(in_channels, f[0])] + [conv_bn_relu(f[i], f[i + 1]) for i in range(levels - 1)])
        self.decoder_block = nn.ModuleList([conv_bn_relu(f[0], f[0])] + [conv_bn_relu(f[i + 1], f[i]) for i in range(levels - 1)])
        self.conv_block_enc = nn.ModuleList(
            [conv_bn_relu(f[0], f[0]), conv_bn_relu(f[1], f[1])]
            + [nn.Sequential(conv_bn_relu(f[i + 1], f[i + 1]), conv_bn_relu(f[i + 1], f[i + 1])) for i in range(1, levels - 1)]
        )
        self.conv_block_dec = nn.ModuleList(
            [conv_bn_relu(f[0], f[0]), conv_bn_relu(f[0], f[0])]
            + [nn.Sequential(conv_bn_relu(f[i], f[i]), conv_bn_relu(f[i], f[i])) for i in range(1, levels - 1)]
        )
        init_segnet_weights(self)

    def levels(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Every level's tensors, as MTAN's attention reads them: the encoder's first and second
        block outputs (``u_j``, ``p_j``), and the decoder's unpooled inputs and outputs (top level last)."""
        factor = 2 ** len(self.filters)
        if x.dim() != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"SegNet: input of shape {tuple(x.shape)}; expected (N, C, H, W) with H and W divisible by "
                             f"{factor} (2 ** the {len(self.filters)} levels).")
        enc_u, enc_p, indices = [], [], []
        s = x
        for block, conv in zip(self.encoder_block, self.conv_block_enc):
            u = block(s)
            p = conv(u)
            s, idx = F.max_pool2d(p, kernel_size=2, stride=2, return_indices=True)
            enc_u.append(u)
            enc_p.append(p)
            indices.append(idx)
        unpooled, decoded = [], []
        d = s
        for i in range(len(self.filters)):
            level = len(self.filters) - 1 - i
            g = F.max_unpool2d(d, indices[level], kernel_size=(2, 2), stride=(2, 2), output_size=enc_p[level].shape[-2:])
            d = self.conv_block_dec[level](self.decoder_block[level](g))
            unpooled.append(g)
            decoded.append(d)
        return enc_u, enc_p, unpooled, decoded

    def forward(self, x: Tensor) -> Tensor:
        return self.levels(x)[3][-1]
