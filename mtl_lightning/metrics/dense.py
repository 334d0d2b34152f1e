"""Metrics of dense prediction tasks (per-pixel outputs), exact under DDP.

The three tasks of the NYUv2 / Cityscapes benchmarks as MTAN (Liu et al., CVPR 2019, arXiv 1803.10704)
and Nash-MTL (Navon et al., ICML 2022) evaluate them — ``ConfMatrix``, ``depth_error`` and
``normal_error`` in ``experiments/nyuv2/utils.py`` of github.com/AvivNavon/nash-mtl:

* segmentation: mean IoU and pixel accuracy from the confusion matrix over all labelled pixels;
* depth: mean absolute and mean relative error over the pixels with a depth;
* surface normals: mean and median angle error (degrees) and the fraction of pixels within 11.25°,
  22.5° and 30°, over the pixels with a normal.

Each metric accumulates sums (a confusion matrix, error sums, a fine histogram of angles) rather
than per-batch means, so the result is the same however the data is split into batches and ranks
(the reference code averages per-batch means, which weights a batch of few valid pixels like a
full one; the two agree when every batch has the same number of valid pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor


def _as_labels(preds: Tensor) -> Tensor:
    """Class indices from logits ``(N, C, H, W)``, or labels ``(N, H, W)`` as they are."""
    return preds.argmax(1) if preds.is_floating_point() else preds


def labelled_classes(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Mask of the labels in ``[0, num_classes)`` other than ``ignore_index``: the labelled pixels."""
    return (target >= 0) & (target < num_classes) & (target != ignore_index)


class SegmentationMetrics(torchmetrics.Metric):
    """Mean IoU and pixel accuracy of a semantic segmentation, from the confusion matrix.

    Pixels whose label is ``ignore_index`` (or any value outside ``[0, num_classes)``) are not
    counted. The mean IoU averages over the classes present in the prediction or the labels
    (a class absent from both has no IoU; the reference code would average a NaN).

    Args:
        num_classes: Number of classes C.
        ignore_index: Label of unlabelled pixels (-1 in the MTAN/Nash-MTL NYUv2 and Cityscapes files).

    Examples:
        >>> import torch
        >>> metric = SegmentationMetrics(num_classes=3)
        >>> target = torch.tensor([[[0, 1], [2, -1]]])
        >>> preds = torch.tensor([[[0, 1], [1, 2]]])  # one of the three labelled pixels is wrong
        >>> {k: round(float(v), 4) for k, v in metric(preds, target).items()}
        {'miou': 0.5, 'pixel_accuracy': 0.6667}
    """

    full_state_update = False
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SegmentationMetrics: num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        labels, target = _as_labels(preds), target.long()
        if labels.shape != target.shape:
            raise ValueError(f"SegmentationMetrics: predictions of shape {tuple(labels.shape)} for labels of shape "
                             f"{tuple(target.shape)}; expected logits (N, C, H, W) or labels (N, H, W).")
        n = self.num_classes
        keep = labelled_classes(target, n, self.ignore_index)
        index = n * target[keep] + labels[keep].long()
        self.confmat += torch.bincount(index, minlength=n * n).reshape(n, n)

    def compute(self) -> dict[str, Tensor]:
        h = self.confmat.double()
        hits = h.diagonal()
        union = h.sum(0) + h.sum(1) - hits
        present = union > 0
        miou = (hits[present] / union[present]).mean() if bool(present.any()) else h.new_tensor(float("nan"))
        return {"miou": miou.float(), "pixel_accuracy": (hits.sum() / h.sum().clamp_min(1)).float()}


def labelled_pixels(target: Tensor, invalid_value: float) -> Tensor:
    """(N, H, W) mask of the pixels of a ``(N, C, H, W)`` map that carry a label: every channel finite
    and not all channels equal to ``invalid_value``. The dense tasks' losses mask with it too."""
    finite = torch.isfinite(target).all(1)
    return finite & (target != invalid_value).any(1)


def _channels_first(x: Tensor, channels: int) -> Tensor:
    return x.unsqueeze(1) if x.dim() == 3 and channels == 1 else x


class DepthMetrics(torchmetrics.Metric):
    """Mean absolute error and mean relative error |ŷ − y| / y of a depth map, over the pixels that
    have a depth (target ≠ ``invalid_value``, 0 in the NYUv2 files, and not NaN).

    Examples:
        >>> import torch
        >>> metric = DepthMetrics()
        >>> target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])  # one pixel without depth
        >>> preds = torch.tensor([[[[1.5, 2.0], [9.0, 3.0]]]])
        >>> {k: round(float(v), 4) for k, v in metric(preds, target).items()}
        {'abs_err': 0.5, 'rel_err': 0.25}
    """

    full_state_update = False
    abs_sum: Tensor
    rel_sum: Tensor
    count: Tensor

    def __init__(self, invalid_value: float = 0.0) -> None:
        super().__init__()
        self.invalid_value = invalid_value
        for name in ("abs_sum", "rel_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = _channels_first(preds, 1), _channels_first(target, 1)
        if preds.shape != target.shape:
            raise ValueError(f"DepthMetrics: predictions of shape {tuple(preds.shape)} for targets of shape "
                             f"{tuple(target.shape)}.")
        mask = labelled_pixels(target, self.invalid_value).unsqueeze(1).expand_as(target)
        p, y = preds[mask].double(), target[mask].double()
        err = (p - y).abs()
        self.abs_sum += err.sum()
        self.rel_sum += (err / y.abs()).sum()
        self.count += mask.sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1).double()
        return {"abs_err": (self.abs_sum / n).float(), "rel_err": (self.rel_sum / n).float()}


class NormalMetrics(torchmetrics.Metric):
    """Angle between predicted and true surface normals (degrees): mean, median and the fraction of
    pixels within 11.25°, 22.5° and 30°, over the pixels that have a normal (a non-zero, finite target).

    Predictions are normalised to unit length first (the angle does not depend on their norm). The
    mean and the fractions are exact; the median is read from a histogram of ``bin_width``-degree
    bins (summed across ranks like the other states), each middle value taken at its bin's centre:
    within ``bin_width / 2`` of the exact median.

    Examples:
        >>> import torch
        >>> metric = NormalMetrics()
        >>> target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
        >>> preds = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
        >>> {k: round(float(v), 1) for k, v in metric(preds, target).items()}  # angles 0° and 45°
        {'mean_angle': 22.5, 'median_angle': 22.5, 'within_11.25': 0.5, 'within_22.5': 0.5, 'within_30': 0.5}
    """

    full_state_update = False
    thresholds = (11.25, 22.5, 30.0)
    histogram: Tensor
    angle_sum: Tensor
    within: Tensor

    def __init__(self, bin_width: float = 0.01) -> None:
        super().__init__()
        if not 0 < bin_width <= 1:
            raise ValueError(f"NormalMetrics: bin_width must be in (0, 1] degrees, got {bin_width}.")
        self.bin_width = bin_width
        self.num_bins = math.ceil(180.0 / bin_width)
        self.add_state("histogram", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(self.thresholds), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape or preds.dim() != 4:
            raise ValueError(f"NormalMetrics: predictions {tuple(preds.shape)} and targets {tuple(target.shape)} "
                             "must both be (N, 3, H, W).")
        mask = labelled_pixels(target, 0.0)
        cos = (F.normalize(preds.double(), dim=1) * F.normalize(target.double(), dim=1)).sum(1)[mask]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
        self.angle_sum += angle.sum()
        for i, limit in enumerate(self.thresholds):
            self.within[i] += (angle < limit).sum()
        bins = (angle / self.bin_width).long().clamp_(0, self.num_bins - 1)
        self.histogram += torch.bincount(bins, minlength=self.num_bins)

    def _order_statistic(self, cumulative: Tensor, rank: int) -> float:
        """Centre of the bin holding the ``rank``-th smallest angle (0-based)."""
        k = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype, device=cumulative.device),
                                   right=True))
        return (min(k, self.num_bins - 1) + 0.5) * self.bin_width

    def compute(self) -> dict[str, Tensor]:
        count = int(self.histogram.sum())
        n = max(count, 1)
        cumulative = self.histogram.cumsum(0)
        if count:  # numpy's median: the mean of the two middle order statistics
            median = 0.5 * (self._order_statistic(cumulative, (count - 1) // 2) + self._order_statistic(cumulative, count // 2))
        else:
            median = float("nan")
        out = {"mean_angle": self.angle_sum / n if count else self.angle_sum.new_tensor(float("nan")),
               "median_angle": torch.tensor(median, dtype=torch.float64)}
        for limit, hits in zip(self.thresholds, self.within):
            out[f"within_{limit:g}"] = hits.double() / n
        return {k: v.float() for k, v in out.items()}
