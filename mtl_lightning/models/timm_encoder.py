"""A timm image backbone as the shared encoder, its weights read from a local file.

The model is built with ``pretrained=False`` (timm downloads nothing); ``pretrained_path`` is a
``.safetensors`` file or a ``torch.save``'d state dict (read with ``weights_only=True``). Needs the
``timm`` extra (``pip install "mtl-lightning[timm]"``).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mtl_lightning.extras import require


def load_state_dict_file(path: str, owner: str) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (tensors only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{owner}: pretrained_path={path!r} does not exist (expected a .safetensors or torch.save state-dict file, "
            "e.g. timm.create_model(name, pretrained=True).state_dict() saved once where there is network access)."
        )
    if path.endswith(".safetensors"):
        return require("safetensors.torch", "timm").load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TimmEncoder(nn.Module):
    """A timm backbone (``timm.create_model(name, pretrained=False, num_classes=0)``).

    Args:
        name: The timm model name (e.g. ``"resnet18"``, ``"vit_tiny_patch16_224"``).
        pretrained_path: Local weights (safetensors or torch state dict); None: random initialisation.
        features: ``"pooled"`` (B, C) features (``out_features`` = C) or ``"multiscale"``: the list of
            feature maps of every stage (``features_only``; ``out_channels`` lists their widths), for
            dense heads or architectures such as MTAN.
        in_chans: Input channels.
        trainable: Train the backbone's weights.
        model_kwargs: Further ``timm.create_model`` options (e.g. ``{"img_size": 32}``).

    Examples:
        >>> import torch
        >>> from mtl_lightning.models import TimmEncoder
        >>> encoder = TimmEncoder("resnet10t")
        >>> encoder.out_features, tuple(encoder(torch.randn(2, 3, 32, 32)).shape)
        (512, (2, 512))
    """

    def __init__(self, name: str, pretrained_path: Optional[str] = None, features: str = "pooled", in_chans: int = 3,
                 trainable: bool = True, model_kwargs: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if features not in ("pooled", "multiscale"):
            raise ValueError(f"TimmEncoder: features must be 'pooled' or 'multiscale', got {features!r}.")
        timm = require("timm", "timm")
        kwargs = dict(model_kwargs or {})
        if features == "multiscale":
            kwargs["features_only"] = True
        else:
            kwargs["num_classes"] = 0
        self.backbone = timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)
        if pretrained_path is not None:
            state = load_state_dict_file(os.fspath(pretrained_path), "TimmEncoder")
            own = self.backbone.state_dict()
            if features == "pooled":  # a classifier checkpoint: its head is not part of the backbone
                state = {k: v for k, v in state.items() if k in own}
            missing = [k for k in own if k not in state]
            mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
            if missing or mismatched:
                raise ValueError(f"TimmEncoder: pretrained_path={pretrained_path!r} does not fit '{name}' "
                                 f"(missing {missing[:4]}, other shapes {mismatched[:4]}); is it a checkpoint of another model?")
            self.backbone.load_state_dict(state, strict=features == "pooled")
        self.name = name
        self.features = features
        self.out_channels: list[int] = (list(self.backbone.feature_info.channels()) if features == "multiscale"
                                        else [int(self.backbone.num_features)])
        self.out_features: Optional[int] = None if features == "multiscale" else int(self.backbone.num_features)
        self.backbone.requires_grad_(trainable)

    def forward(self, x: Tensor) -> Union[Tensor, list[Tensor]]:
        return self.backbone(x)
