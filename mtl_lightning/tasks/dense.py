"""Dense prediction tasks: one output per pixel (semantic segmentation, depth, surface normals).

Losses and metrics follow the NYUv2 / Cityscapes protocol of MTAN (Liu et al., CVPR 2019) and
Nash-MTL (Navon et al., ICML 2022; ``experiments/nyuv2/utils.py`` of github.com/AvivNavon/nash-mtl):
cross-entropy with an ignore label, L1 on the pixels with a depth, 1 − cosine on the pixels with a
normal. A pixel without a label is masked out of its task's loss and metrics, as a sample without a
label is for the other tasks; an image with no labelled pixel for a task does not count for it.

The heads read spatial features ``(N, F, H, W)`` (the encoder's ``out_features`` is F) and output
``(N, C, H, W)``; the default head is MTAN's prediction head, a 3×3 convolution F → F followed by a
1×1 convolution F → C. ``head_type="deeplab"`` builds LibMTL's
:class:`~mtl_lightning.models.DeepLabHead` (ASPP) instead, and ``head_upsample`` resizes the
output bilinearly by the encoder's output stride (a dilated ResNet's features are 1/8 of the image).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from mtl_lightning.metrics.dense import (
    DepthMetrics,
    NormalMetrics,
    SegmentationMetrics,
    labelled_classes,
    labelled_pixels,
)
from mtl_lightning.tasks.task import MetricSpec, Task, TaskConfigError


#: The default heads of the dense tasks (``head_type``).
HEAD_TYPES = ("conv", "deeplab")


class DenseTask(Task):
    """Base class of the per-pixel tasks: the conv head, shape checks and masked means.

    A dense task's metrics come from one accumulator (:attr:`metric_class`) whose ``compute()``
    returns every metric at once; :attr:`directions` gives each metric's direction.

    Args:
        name: Task name.
        head_type: The head built when none is given: ``"conv"`` (MTAN's 3×3 and 1×1 convolutions)
            or ``"deeplab"`` (:class:`~mtl_lightning.models.DeepLabHead`, LibMTL's ASPP head).
        head_upsample: Factor of a bilinear resize of the built head's output (``align_corners=True``,
            as LibMTL's ``process_preds``): the encoder's output stride, so the output fits the labels.
        **kwargs: :class:`~mtl_lightning.tasks.Task`'s arguments (``label_key``, ``head``, ``baselines``).
    """

    #: Channels of the target map (0: a map of class indices, ``(N, H, W)``).
    target_channels: int = 1
    #: ``{metric: higher_is_better}`` of the accumulator's outputs.
    directions: dict[str, bool] = {}

    def __init__(self, name: str, head_type: str = "conv", head_upsample: int = 1, **kwargs: Any) -> None:
        if head_type not in HEAD_TYPES:
            raise TaskConfigError(f"Task '{name}': head_type must be one of {list(HEAD_TYPES)}, got {head_type!r}.")
        if head_upsample < 1:
            raise TaskConfigError(f"Task '{name}': head_upsample must be >= 1, got {head_upsample}.")
        self.head_type, self.head_upsample = head_type, head_upsample
        super().__init__(name, **kwargs)

    def make_metric(self) -> torchmetrics.Metric:
        """The accumulator of every metric of the task."""
        raise NotImplementedError

    def metric_specs(self) -> dict[str, MetricSpec]:
        return {name: MetricSpec(self.make_metric, better) for name, better in self.directions.items()}

    def make_metrics(self) -> dict[str, torchmetrics.Metric]:
        return {self.name: self.make_metric()}

    def build_head(self, in_features: int) -> nn.Module:
        """The configured head, else the ``head_type`` head on ``in_features`` channels: ``"conv"``
        (MTAN's 3×3 and 1×1 convolutions) or ``"deeplab"`` (LibMTL's ASPP head), resized by ``head_upsample``."""
        if self.head is not None:
            return self.head
        if self.head_type == "deeplab":
            from mtl_lightning.models.deeplab import DeepLabHead

            return DeepLabHead(in_features, self.output_size, upsample=self.head_upsample)
        layers: list[nn.Module] = [nn.Conv2d(in_features, in_features, 3, padding=1), nn.Conv2d(in_features, self.output_size, 1)]
        if self.head_upsample > 1:
            from mtl_lightning.models.deeplab import Upsample

            layers.append(Upsample(self.head_upsample))
        return nn.Sequential(*layers)

    def check_output(self, output: Tensor, target: Tensor) -> None:
        channels = self.target_channels
        expected = (output.shape[0], *output.shape[2:]) if channels == 0 else (output.shape[0], channels, *output.shape[2:])
        if output.ndim != 4 or output.shape[1] != self.output_size:
            raise TaskConfigError(
                f"Task '{self.name}': its head outputs shape {tuple(output.shape)}, but {type(self).__name__} expects "
                f"(batch, {self.output_size}, height, width). Fix the head's output channels or the encoder's features."
            )
        if tuple(target.shape) != tuple(expected):
            raise TaskConfigError(
                f"Task '{self.name}': labels of shape {tuple(target.shape)} for outputs of shape {tuple(output.shape)}; "
                f"expected labels {tuple(expected)} (the head's output size must equal the label map's)."
            )

    def valid_mask(self, target: Tensor) -> Tensor:
        """Per-pixel mask ``(N, H, W)``: which pixels carry a label."""
        raise NotImplementedError

    @staticmethod
    def _masked_mean(per_pixel: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(per_pixel.dtype)
        return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return output.detach(), target  # the metrics mask the unlabelled pixels themselves


class SegmentationTask(DenseTask):
    """Semantic segmentation: per-pixel cross-entropy over ``num_classes`` classes; pixels labelled
    ``ignore_index`` are unlabelled. Metrics: mean IoU and pixel accuracy (higher is better).

    Args:
        name: Task name.
        num_classes: Number of classes (13 for NYUv2, 7 for the 128×256 Cityscapes of MTAN).
        ignore_index: Label of unlabelled pixels (-1 in the MTAN/Nash-MTL files).
    """

    target_channels = 0
    directions = {"miou": True, "pixel_accuracy": True}

    def __init__(self, name: str, num_classes: int, ignore_index: int = -1, **kwargs: Any) -> None:
        if num_classes < 2:
            raise TaskConfigError(f"Task '{name}': num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.output_size = num_classes
        super().__init__(name, **kwargs)

    def make_metric(self) -> torchmetrics.Metric:
        return SegmentationMetrics(self.num_classes, self.ignore_index)

    def valid_mask(self, target: Tensor) -> Tensor:
        return labelled_classes(target, self.num_classes, self.ignore_index)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        mask = self.valid_mask(target)
        per_pixel = F.cross_entropy(output, target.long().where(mask, 0), reduction="none")
        return self._masked_mean(per_pixel, mask)

    def predict(self, output: Tensor) -> Tensor:
        return output.argmax(1)


class DepthTask(DenseTask):
    """Depth estimation: L1 on the pixels that have a depth (target ≠ ``invalid_value`` and finite).
    Metrics: absolute and relative error (lower is better).

    Args:
        name: Task name.
        invalid_value: Target value of pixels without depth (0 in the NYUv2 files).
    """

    output_size = 1
    directions = {"abs_err": False, "rel_err": False}

    def __init__(self, name: str, invalid_value: float = 0.0, **kwargs: Any) -> None:
        self.invalid_value = invalid_value
        super().__init__(name, **kwargs)

    def make_metric(self) -> torchmetrics.Metric:
        return DepthMetrics(self.invalid_value)

    def valid_mask(self, target: Tensor) -> Tensor:
        return labelled_pixels(target, self.invalid_value)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        mask = self.valid_mask(target)
        per_pixel = (output[:, 0] - target[:, 0].where(mask, 0.0)).abs()
        return self._masked_mean(per_pixel, mask)


class NormalTask(DenseTask):
    """Surface normals: 1 − cos(ŷ, y) on the pixels that have a normal (a finite, non-zero target),
    the prediction normalised to unit length first (MTAN's head normalises its output; doing it in
    the loss lets any head be used). Metrics: mean and median angle error (lower is better) and the
    fraction of pixels within 11.25°, 22.5° and 30° (higher is better).

    Args:
        name: Task name.
        bin_width: Width (degrees) of the histogram bins the median is read from.
    """

    output_size = 3
    target_channels = 3
    directions = {"mean_angle": False, "median_angle": False, "within_11.25": True, "within_22.5": True,
                  "within_30": True}

    def __init__(self, name: str, bin_width: float = 0.01, **kwargs: Any) -> None:
        self.bin_width = bin_width
        super().__init__(name, **kwargs)

    def make_metric(self) -> torchmetrics.Metric:
        return NormalMetrics(self.bin_width)

    def valid_mask(self, target: Tensor) -> Tensor:
        return labelled_pixels(target, 0.0)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        mask = self.valid_mask(target)
        cosine = (F.normalize(output, dim=1) * target.where(mask.unsqueeze(1), 0.0)).sum(1)
        return 1.0 - self._masked_mean(cosine, mask)

    def predict(self, output: Tensor) -> Tensor:
        return F.normalize(output, dim=1)


__all__ = ["DenseTask", "SegmentationTask", "DepthTask", "NormalTask"]
