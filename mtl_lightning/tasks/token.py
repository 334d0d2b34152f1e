"""Token-level classification (tagging): one class per token, for encoders with per-token features
(``TransformerEncoder(pooling="tokens")``)."""

from __future__ import annotations

from torch import Tensor

from mtl_lightning.tasks.task import ClassificationTask, TaskConfigError


class TokenClassificationTask(ClassificationTask):
    """Cross-entropy over the tokens of each sequence: outputs ``(batch, length, num_classes)`` (the
    default linear head applied to per-token features ``(batch, length, hidden)``), labels
    ``(batch, length)`` with ``ignore_index`` (default -100, as Hugging Face) on padding and on tokens
    without a label. The loss is the mean over labelled tokens; the metrics (accuracy, macro F1) count
    tokens. Arguments as :class:`ClassificationTask`.
    """

    def check_output(self, output: Tensor, target: Tensor) -> None:
        if output.ndim != 3 or output.shape[-1] != self.output_size:
            raise TaskConfigError(
                f"Task '{self.name}': its head outputs shape {tuple(output.shape)}, but TokenClassificationTask expects "
                f"(batch, length, {self.output_size}); give the encoder per-token features (e.g. pooling: tokens)."
            )
        if tuple(target.shape) != tuple(output.shape[:2]):
            raise TaskConfigError(
                f"Task '{self.name}': labels of shape {tuple(target.shape)} for outputs of shape {tuple(output.shape)}; "
                f"expected one label per token, {tuple(output.shape[:2])}."
            )
        self.validate_labels(target, "the first batch")

    def validate_labels(self, labels: Tensor, where: str) -> int:
        """Class indices per token: a 2-D integer tensor, each in [0, num_classes) or ``ignore_index``."""
        if labels.ndim != 2:
            raise TaskConfigError(f"Task '{self.name}': token labels must be (batch, length), got shape "
                                  f"{tuple(labels.shape)} in {where}.")
        return super().validate_labels(labels.reshape(-1), where)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return super().loss(output.flatten(0, 1), target.flatten())
