"""Tasks as first-class objects.

A :class:`Task` knows everything that is specific to one learning problem: its name, where its
label sits in the batch, how to build its head, its loss, its metrics (each with a direction) and
optional single-task baselines. The :class:`~mtl_lightning.models.MultiTaskModule` owns the
modules; the task describes them. Samples may lack a label for a task: such samples are masked out
of that task's loss and metrics (never counted as zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torchmetrics
from torch import Tensor, nn


@dataclass(frozen=True)
class MetricSpec:
    """A metric factory with its direction (``higher_is_better``)."""

    factory: Callable[[], torchmetrics.Metric]
    higher_is_better: bool


class TaskConfigError(ValueError):
    """A task is configured inconsistently with the model or the data."""


class Task:
    """Base class of a task. Subclasses define the head size, the loss and the metrics.

    Args:
        name: Unique task name; used in every logged key (``train/<name>/loss``).
        label_key: Key of the task's label in the batch dict (defaults to ``name``).
        head: Optional head module mapping the encoder's features to this task's outputs. When
            omitted, :meth:`build_head` makes a linear head (or an MLP, see ``head_hidden``).
        head_hidden: Hidden sizes of the default MLP head (empty: a single linear layer).
        baselines: Single-task baseline value of each metric (``{"accuracy": 0.97}``), used for
            Δ_MTL and negative-transfer monitoring.
    """

    #: Number of outputs of the head.
    output_size: int

    def __init__(
        self,
        name: str,
        label_key: Optional[str] = None,
        head: Optional[nn.Module] = None,
        head_hidden: tuple[int, ...] = (),
        baselines: Optional[dict[str, float]] = None,
    ) -> None:
        if not name or "/" in name:
            raise TaskConfigError(f"Task name {name!r} must be a non-empty string without '/'.")
        self.name = name
        self.label_key = label_key or name
        self.head = head
        self.head_hidden = tuple(head_hidden)
        self.baselines = dict(baselines or {})
        unknown = set(self.baselines) - set(self.metric_specs())
        if unknown:
            raise TaskConfigError(
                f"Task '{name}': baselines given for unknown metric(s) {sorted(unknown)}; "
                f"the task's metrics are {sorted(self.metric_specs())}."
            )

    # ----------------------------------------------------------------- to override
    def metric_specs(self) -> dict[str, MetricSpec]:
        """The task's metrics by name."""
        raise NotImplementedError

    def valid_mask(self, target: Tensor) -> Tensor:
        """Boolean mask over the batch: which samples carry a label for this task."""
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the valid samples (caller guarantees at least one).

        The built-in tasks mask rather than index (``output[mask]`` waits for the GPU to count the
        mask), so a training step costs no host synchronisation per task."""
        raise NotImplementedError

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(preds, target) as the metrics expect them, valid samples only."""
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:
        """Human-facing prediction from the head's raw output."""
        return output

    def validate_labels(self, labels: Tensor, where: str) -> int:
        """Check a whole label tensor of this task (a split's, or a batch's) and return how many
        samples are labelled. Raise :class:`TaskConfigError` naming the task, ``where`` (e.g.
        ``"the train split of MultiDigitsDataModule"``), the offending value and how many there are.

        Runs once per split at set-up, vectorised over the tensor the dataset holds, so it must not
        loop over samples. The default counts ``valid_mask(labels)``; subclasses add the checks of
        their label format (range, width, dtype) and may call this for the count."""
        return int(self.valid_mask(labels).sum())

    # ----------------------------------------------------------------- shared
    def build_head(self, in_features: int) -> nn.Module:
        """The configured head, or a default MLP/linear head on ``in_features`` inputs."""
        if self.head is not None:
            return self.head
        layers: list[nn.Module] = []
        width = in_features
        for hidden in self.head_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.output_size))
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)

    def make_metrics(self) -> dict[str, torchmetrics.Metric]:
        return {name: spec.factory() for name, spec in self.metric_specs().items()}

    def higher_is_better(self) -> dict[str, bool]:
        return {name: spec.higher_is_better for name, spec in self.metric_specs().items()}

    def get_target(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.label_key not in batch:
            raise KeyError(
                f"Task '{self.name}': the batch has no label key '{self.label_key}'. "
                f"Keys present: {sorted(batch)}. Set the task's label_key or add the label to the data."
            )
        return batch[self.label_key]

    def check_output(self, output: Tensor, target: Tensor) -> None:
        """Raise a clear error when the head's output cannot fit this task's loss."""
        if output.ndim != 2 or output.shape[-1] != self.output_size:
            raise TaskConfigError(
                f"Task '{self.name}': its head outputs shape {tuple(output.shape)}, but "
                f"{type(self).__name__} expects (batch, {self.output_size}). Fix the head's output size."
            )
        if target.shape[0] != output.shape[0]:
            raise TaskConfigError(
                f"Task '{self.name}': {output.shape[0]} outputs but {target.shape[0]} labels in the batch."
            )
        self.validate_labels(target, "the first batch")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, label_key={self.label_key!r})"

    def _bad_values(self, labels: Tensor, bad: Tensor, where: str, rule: str) -> None:
        """Raise, naming the offending values (the first five) and their count, when ``bad`` (a
        mask over ``labels``) has any entry; ``rule`` says what they are (``"outside [0, 3)"``)."""
        count = int(bad.sum())
        if not count:
            return
        distinct = torch.unique(labels[bad])
        values = [_format_value(v) for v in distinct[:5].tolist()]
        if count == 1:
            raise TaskConfigError(f"Task '{self.name}': label {values[0]} in {where} is {rule}.")
        more = ", …" if len(distinct) > 5 else ""
        raise TaskConfigError(f"Task '{self.name}': {count} labels in {where} are {rule}: values {', '.join(values)}{more}.")


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ClassificationTask(Task):
    """Single-label classification with cross-entropy. Missing labels carry ``ignore_index``.

    Metrics: ``accuracy`` (micro) and ``f1`` (macro), both higher-is-better.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        label_key: Optional[str] = None,
        head: Optional[nn.Module] = None,
        head_hidden: tuple[int, ...] = (),
        baselines: Optional[dict[str, float]] = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> None:
        if num_classes < 2:
            raise TaskConfigError(f"Task '{name}': num_classes must be >= 2, got {num_classes}.")
        self.num_classes = num_classes
        self.output_size = num_classes
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        super().__init__(name, label_key, head, head_hidden, baselines)

    def metric_specs(self) -> dict[str, MetricSpec]:
        n = self.num_classes
        return {
            "accuracy": MetricSpec(lambda: torchmetrics.Accuracy("multiclass", num_classes=n), True),
            "f1": MetricSpec(lambda: torchmetrics.F1Score("multiclass", num_classes=n, average="macro"), True),
        }

    def valid_mask(self, target: Tensor) -> Tensor:
        return target != self.ignore_index

    def validate_labels(self, labels: Tensor, where: str) -> int:
        """Class indices: a 1-D integer tensor, each in [0, num_classes) or ``ignore_index``."""
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TaskConfigError(
                f"Task '{self.name}': classification labels must be a 1-D integer tensor of class "
                f"indices, got dtype {labels.dtype} and shape {tuple(labels.shape)} in {where}."
            )
        missing = labels == self.ignore_index
        bad = ~missing & ((labels < 0) | (labels >= self.num_classes))
        self._bad_values(labels, bad, where, f"outside [0, {self.num_classes}) and not the missing-label value "
                         f"ignore_index={self.ignore_index}")
        return int(labels.numel() - missing.sum())

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(
            output.float(), target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.valid_mask(target)
        return output[mask].float(), target[mask]

    def predict(self, output: Tensor) -> Tensor:
        return output.softmax(-1)


class MultiLabelTask(Task):
    """Multi-label classification with per-label binary cross-entropy on logits.

    Labels are a (batch, num_labels) tensor of 0/1; a label is missing where it is negative or NaN,
    and only the present entries enter the loss and the metrics.
    Metrics: ``accuracy`` and ``f1`` (macro over labels), higher-is-better.
    """

    def __init__(
        self,
        name: str,
        num_labels: int,
        label_key: Optional[str] = None,
        head: Optional[nn.Module] = None,
        head_hidden: tuple[int, ...] = (),
        baselines: Optional[dict[str, float]] = None,
    ) -> None:
        self.num_labels = num_labels
        self.output_size = num_labels
        super().__init__(name, label_key, head, head_hidden, baselines)

    def metric_specs(self) -> dict[str, MetricSpec]:
        n = self.num_labels
        return {
            "accuracy": MetricSpec(
                lambda: torchmetrics.Accuracy("multilabel", num_labels=n, ignore_index=-1), True
            ),
            "f1": MetricSpec(
                lambda: torchmetrics.F1Score("multilabel", num_labels=n, average="macro", ignore_index=-1),
                True,
            ),
        }

    def _entry_mask(self, target: Tensor) -> Tensor:
        target = target.float()
        return ~torch.isnan(target) & (target >= 0)

    def valid_mask(self, target: Tensor) -> Tensor:
        return self._entry_mask(target).any(dim=-1)

    def validate_labels(self, labels: Tensor, where: str) -> int:
        """Shape (n, num_labels); every present entry (not negative, not NaN) is 0 or 1."""
        if labels.ndim != 2 or labels.shape[1] != self.num_labels:
            raise TaskConfigError(
                f"Task '{self.name}': multi-label targets must have shape (batch, {self.num_labels}), "
                f"got {tuple(labels.shape)} in {where}."
            )
        entries = self._entry_mask(labels)
        self._bad_values(labels, entries & (labels != 0) & (labels != 1), where,
                         "neither 0 nor 1 (a missing entry is negative or NaN)")
        return int(entries.any(dim=-1).sum())

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        entries = self._entry_mask(target)
        per_entry = nn.functional.binary_cross_entropy_with_logits(
            output.float(), torch.where(entries, target.float(), 0.0), reduction="none"
        )
        return torch.where(entries, per_entry, 0.0).sum() / entries.sum()

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        # Missing entries become -1, the metrics' ignore_index.
        rows = self.valid_mask(target)
        target = target[rows].float()
        target = torch.where(self._entry_mask(target), target, torch.full_like(target, -1)).long()
        return output[rows].float().sigmoid(), target

    def predict(self, output: Tensor) -> Tensor:
        return output.sigmoid()


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class RegressionTask(Task):
    """Regression with mean squared error (or L1). Missing labels are NaN.

    Metrics: ``mse`` and ``mae``, lower-is-better.

    Args:
        num_outputs: Number of regression targets (labels of shape (batch,) or (batch, n)).
        loss_fn: ``"mse"`` or ``"l1"``.
    """

    def __init__(
        self,
        name: str,
        num_outputs: int = 1,
        label_key: Optional[str] = None,
        head: Optional[nn.Module] = None,
        head_hidden: tuple[int, ...] = (),
        baselines: Optional[dict[str, float]] = None,
        loss_fn: str = "mse",
    ) -> None:
        if loss_fn not in ("mse", "l1"):
            raise TaskConfigError(f"Task '{name}': loss_fn must be 'mse' or 'l1', got {loss_fn!r}.")
        self.num_outputs = num_outputs
        self.output_size = num_outputs
        self.loss_fn = loss_fn
        super().__init__(name, label_key, head, head_hidden, baselines)

    def metric_specs(self) -> dict[str, MetricSpec]:
        return {
            "mse": MetricSpec(torchmetrics.MeanSquaredError, False),
            "mae": MetricSpec(torchmetrics.MeanAbsoluteError, False),
        }

    def _as_2d(self, target: Tensor) -> Tensor:
        return target.float().reshape(target.shape[0], -1)

    def valid_mask(self, target: Tensor) -> Tensor:
        return ~torch.isnan(self._as_2d(target)).any(dim=-1)

    def validate_labels(self, labels: Tensor, where: str) -> int:
        """``num_outputs`` values per sample, each finite or NaN (missing)."""
        if labels.ndim == 0 or not (labels.is_floating_point() or labels.dtype in _INTEGER_DTYPES):
            raise TaskConfigError(
                f"Task '{self.name}': regression labels must be a numeric tensor of shape (n,) or (n, {self.num_outputs}), "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)} in {where}."
            )
        flat = self._as_2d(labels)
        if flat.shape[-1] != self.num_outputs:
            raise TaskConfigError(
                f"Task '{self.name}': regression labels have {flat.shape[-1]} values per sample in {where} "
                f"but the task has num_outputs={self.num_outputs}."
            )
        self._bad_values(flat, torch.isinf(flat), where, "infinite (a missing label is NaN)")
        return int(self.valid_mask(flat).sum())

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        target = self._as_2d(target)
        rows = self.valid_mask(target).unsqueeze(1)  # a row with any NaN is unlabelled
        error = output.float() - torch.where(rows, target, 0.0)  # NaN labels would poison the backward
        per_entry = error.square() if self.loss_fn == "mse" else error.abs()
        return torch.where(rows, per_entry, 0.0).sum() / (rows.sum() * target.shape[1])

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.valid_mask(target)
        return output.float()[mask].flatten(), self._as_2d(target)[mask].flatten()
