"""ResNet-18/34/50/101/152 (He et al., CVPR 2016) as a shared encoder, in plain torch.

The modules and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, …; ResNet-50 and deeper use the v1.5 bottleneck, stride in the 3×3
convolution), without the classifier ``fc``. So a torchvision ImageNet checkpoint loads into it
unchanged: download it once where you have a network (torchvision's ``resnet18-f37072fd.pth``, or
any ``.pth`` / ``.safetensors`` state dict of these names) and give its path as ``weights``. Nothing
is downloaded here, and ``.pth`` files are read with ``torch.load(weights_only=True)``: a file that
holds pickled objects other than tensors is refused, never run.

The output is the global-average-pooled last feature map: ``out_features`` = 8 × ``width`` (× 4
for the bottleneck depths), i.e. 512 for ResNet-18/34 and 2048 for ResNet-50 and deeper. With
``dense=True`` it is that feature map itself, ``(batch, out_features, H / s, W / s)``, for dense heads
(:class:`~mtl_lightning.models.DeepLabHead`, the dense tasks' default heads).

``output_stride`` ``s`` (32, 16 or 8) is the dilated ResNet of Yu et al. (CVPR 2017) as DeepLab and
LibMTL's NYUv2 / Cityscapes encoder use it (``LibMTL/model/resnet_dilated.py`` of
github.com/median-research-group/LibMTL, ``dilate_scale``): the stride 2 of layer4 (16), or of layer3
and layer4 (8), becomes stride 1 and the later 3×3 convolutions are dilated instead: by 2 from layer3
on and 4 in layer4 (stride 8). The convolution in the stride's place (each dilated stage's first 3×3
and its 1×1 ``downsample``) keeps the previous dilation: torchvision's
``replace_stride_with_dilation=[False, True, True]`` for the bottleneck depths, and LibMTL's
``_nostride_dilate`` for all (torchvision does not dilate basic blocks). Only strides and dilations
change, never a weight's shape, so the same checkpoints load.

``width`` (64 in the paper) scales every layer, and ``stem="cifar"`` replaces the 7×7 stride-2
convolution and max-pool by one 3×3 stride-1 convolution (the small-image variant used by Sener &
Koltun's CelebA model, ``multi_task/models/multi_faces_resnet.py`` of
github.com/isl-org/MultiObjectiveOptimization). Both change the shapes, so an ImageNet checkpoint
then no longer fits; the tests use ``width=4`` to stay fast.

``hidden_features`` adds LibMTL's shared projection on the pooled features (``examples/office/main.py``
of github.com/median-research-group/LibMTL): ``Linear → BatchNorm1d → ReLU → Dropout``, the linear
layer initialised N(0, 0.005²) with bias 0.1. It is not part of a torchvision checkpoint, so it keeps
its initialisation when ``weights`` are loaded.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor, nn

#: Blocks per stage of each depth (torchvision's ``resnet18`` … ``resnet152``).
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "cifar")
#: The stages (0-based: 2 is layer3) whose stride 2 becomes dilation, by output stride.
OUTPUT_STRIDES: dict[int, tuple[int, ...]] = {32: (), 16: (3,), 8: (2, 3)}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and the identity (or a 1×1 ``downsample``) shortcut.

    ``dilation`` is that of the 3×3 convolutions; ``first_dilation`` (default: ``dilation``) that of
    ``conv1``, the convolution in the stride's place (see :class:`ResNet`'s ``output_stride``).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation if first_dilation is None else first_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (with the stride: torchvision's v1.5), 1×1 expand by 4, and the shortcut.

    The 3×3 convolution is the one in the stride's place: its dilation is ``first_dilation``
    (default: ``dilation``), as in torchvision, whose first block of a dilated stage gets the
    previous stage's dilation.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, first_dilation: Optional[int] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation if first_dilation is None else first_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet encoder: images ``(batch, in_channels, H, W)`` → features ``(batch, out_features)``.

    Args:
        depth: 18, 34, 50, 101 or 152.
        weights: Optional path to a local ``.pth`` / ``.pt`` / ``.safetensors`` state dict with
            torchvision's parameter names (its ``fc.*`` entries are ignored); ``None`` keeps the
            random initialisation (torchvision's: Kaiming-normal convolutions, unit BatchNorm).
        width: Channels of the first stage (64 in the paper; the stages have 1, 2, 4, 8 × width).
        in_channels: Image channels.
        stem: ``"imagenet"`` (7×7 stride-2 convolution and 3×3 max-pool) or ``"cifar"`` (one 3×3
            stride-1 convolution, no pool; for small images).
        hidden_features: Width of an optional shared ``Linear → BatchNorm1d → ReLU → Dropout`` layer
            after the pooling (LibMTL's Office encoder uses 512); ``None``: none.
        hidden_dropout: Dropout of that layer (LibMTL: 0.5).
        output_stride: 32 (the plain ResNet), 16 or 8: layer4's (16), or layer3's and layer4's (8),
            strides replaced by dilation. With ``stem="cifar"`` the overall stride is 4 times smaller.
        dense: Return the last feature map ``(batch, out_features, H / output_stride, W / output_stride)``
            instead of its global average (no ``hidden_features`` then).

    Examples:
        >>> import torch
        >>> net = ResNet(50, width=4, output_stride=8, dense=True)
        >>> tuple(net(torch.randn(2, 3, 64, 96)).shape)
        (2, 128, 8, 12)
    """

    #: The stages, set by name (``layer1``…``layer4``) as torchvision names them.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    maxpool: nn.Module

    def __init__(self, depth: int = 18, weights: Optional[str] = None, width: int = 64, in_channels: int = 3,
                 stem: str = "imagenet", hidden_features: Optional[int] = None, hidden_dropout: float = 0.0,
                 output_stride: int = 32, dense: bool = False) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet: depth must be one of {sorted(DEPTHS)}, got {depth}.")
        if width < 1:
            raise ValueError(f"ResNet: width must be >= 1, got {width}.")
        if stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {list(STEMS)}, got {stem!r}.")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"ResNet: output_stride must be one of {list(OUTPUT_STRIDES)}, got {output_stride}.")
        if dense and hidden_features is not None:
            raise ValueError("ResNet: dense=True returns the feature map; hidden_features (a layer on the pooled "
                             "features) must then be None.")
        kind, blocks = DEPTHS[depth]
        block: type[Union[BasicBlock, Bottleneck]] = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.in_channels, self.stem = depth, width, in_channels, stem
        self.output_stride, self.dense = output_stride, dense
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        channels, dilation = width, 1
        dilated = OUTPUT_STRIDES[output_stride]
        for stage, count in enumerate(blocks):
            planes, stride = width * 2**stage, 1 if stage == 0 else 2
            previous = dilation
            if stage in dilated:  # the stride becomes dilation (torchvision's replace_stride_with_dilation)
                dilation, stride = dilation * stride, 1
            downsample = None
            if stride != 1 or channels != planes * block.expansion:
                downsample = nn.Sequential(_conv1x1(channels, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(channels, planes, stride, downsample, dilation=dilation, first_dilation=previous)]
            channels = planes * block.expansion
            layers += [block(channels, planes, dilation=dilation) for _ in range(count - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.hidden: Optional[nn.Sequential] = None
        if hidden_features is not None:
            if hidden_features < 1 or not 0 <= hidden_dropout < 1:
                raise ValueError(f"ResNet: hidden_features must be >= 1 and hidden_dropout in [0, 1), got "
                                 f"{hidden_features} and {hidden_dropout}.")
            linear = nn.Linear(channels, hidden_features)
            nn.init.normal_(linear.weight, 0.0, 0.005)
            nn.init.constant_(linear.bias, 0.1)
            self.hidden = nn.Sequential(linear, nn.BatchNorm1d(hidden_features), nn.ReLU(), nn.Dropout(hidden_dropout))
        self.out_features = hidden_features if hidden_features is not None else channels
        self.weights = weights
        if weights is not None:
            self.load_weights(weights)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet expects images of shape (batch, {self.in_channels}, height, width), "
                             f"got {tuple(x.shape)}.")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.dense:
            return x
        features = self.avgpool(x).flatten(1)
        return features if self.hidden is None else self.hidden(features)

    def load_weights(self, path: str) -> None:
        """Load a torchvision-named state dict from ``path`` into the backbone (``fc.*`` ignored; a
        ``hidden.*`` layer is loaded when the file has it); raise naming the file and the first
        mismatching keys or shapes."""
        state = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = self.state_dict()
        if not any(k.startswith("hidden.") for k in state):
            expected = {k: v for k, v in expected.items() if not k.startswith("hidden.")}
        # Old torchvision checkpoints lack BatchNorm's num_batches_tracked; BatchNorm fills it in.
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        if problems:
            raise ValueError(
                f"ResNet: weights file '{path}' does not fit ResNet(depth={self.depth}, width={self.width}, "
                f"in_channels={self.in_channels}, stem={self.stem!r}): {'; '.join(problems)}. It needs torchvision's "
                f"resnet{self.depth} parameter names (conv1.weight, layer1.0.conv1.weight, …)."
            )
        self.load_state_dict(state, strict=False)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` state dict from a ``.safetensors`` file or a torch file read with
    ``weights_only=True`` (a ``{"state_dict": …}`` or ``{"model": …}`` wrapper is unwrapped)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ResNet: weights file '{path}' does not exist. Give a local .pth or .safetensors "
                                "state dict (e.g. torchvision's resnet18-f37072fd.pth); nothing is downloaded.")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - safetensors ships with most torch stacks
            raise ImportError(f"ResNet: reading '{path}' needs the safetensors package.") from err
        return dict(load_file(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"ResNet: could not read weights file '{path}' with torch.load(weights_only=True): {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"ResNet: weights file '{path}' is not a state dict of tensors.")
    return state


__all__ = ["ResNet", "BasicBlock", "Bottleneck", "DEPTHS", "OUTPUT_STRIDES", "read_state_dict"]
