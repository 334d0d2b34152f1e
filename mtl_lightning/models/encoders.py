"""Shared encoders (hard parameter sharing).

An encoder is any ``nn.Module`` that maps the batch's input to features. To get default heads
built for it, it exposes ``out_features`` (the feature width). It may return one tensor (shared by
every head) or a dict ``{task_name: features}`` (per-task features, as soft-sharing encoders do),
and may define ``regularization() -> Tensor`` — the λR(θ) term added to the joint loss.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected encoder: ``in_features → hidden[0] → … → hidden[-1]`` with ReLU.

    Args:
        in_features: Input width (inputs with more dimensions are flattened).
        hidden: Widths of the hidden layers; the last one is ``out_features``.
        dropout: Dropout after every activation.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP: 'hidden' needs at least one layer width.")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 3×3 conv layers, a 2×2 max-pool and a linear projection; for small images (MultiDigits).

    Args:
        in_channels: Image channels.
        image_size: Height = width of the input image.
        channels: Output channels of the two conv layers.
        out_features: Width of the output features.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 12,
        channels: tuple[int, int] = (32, 64),
        out_features: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * (image_size // 2) ** 2
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(flat, out_features), nn.ReLU())
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"SmallCNN expects images of shape (batch, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}), got {tuple(x.shape)}; set in_channels / image_size."
            )
        return self.project(self.features(x))
