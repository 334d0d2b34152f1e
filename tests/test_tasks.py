import math

import pytest
import torch

from mtl_lightning.tasks import ClassificationTask, MultiLabelTask, RegressionTask, TaskConfigError


def test_classification_loss_skips_missing_labels():
    task = ClassificationTask("digit", 3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([0, 1, -100])
    expected = -(torch.log_softmax(logits[0], 0)[0] + torch.log_softmax(logits[1], 0)[1]) / 2
    assert torch.allclose(task.loss(logits, target), expected)
    assert task.valid_mask(target).tolist() == [True, True, False]
    preds, tgt = task.metric_inputs(logits, target)
    assert preds.shape == (2, 3) and tgt.tolist() == [0, 1]


def test_regression_loss_ignores_nan_labels():
    task = RegressionTask("y")
    out = torch.tensor([[1.0], [2.0], [3.0]])
    target = torch.tensor([2.0, float("nan"), 1.0])
    assert math.isclose(float(task.loss(out, target)), ((1 - 2) ** 2 + (3 - 1) ** 2) / 2)
    l1 = RegressionTask("y", loss_fn="l1")
    assert math.isclose(float(l1.loss(out, target)), (1 + 2) / 2)


def test_multilabel_loss_uses_present_entries_only():
    task = MultiLabelTask("tags", 2)
    out = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    target = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])  # one present entry in row 0, row 1 unlabelled
    assert math.isclose(float(task.loss(out, target)), math.log(2), rel_tol=1e-6)
    assert task.valid_mask(target).tolist() == [True, False]
    preds, tgt = task.metric_inputs(out, target)
    assert tgt.tolist() == [[1, -1]]


@pytest.mark.parametrize("task, target", [
    (ClassificationTask("c", 4, label_smoothing=0.1), torch.tensor([0, 3, -100, 1, -100, 2])),
    (MultiLabelTask("m", 4), torch.tensor([[1.0, 0, float("nan"), 1], [-1, -1, -1, -1], [0, 1, 1, 0],
                                           [1, float("nan"), 0, -1], [0, 0, 0, 1], [1, 1, 1, 1]])),
    (RegressionTask("r", 4), torch.tensor([[0.5, 1, 2, 3], [1, float("nan"), 0, 0], [2, 2, 2, 2],
                                           [float("nan")] * 4, [0, 0, 0, 0], [-1, 1, -1, 1]])),
    (RegressionTask("r", 4, loss_fn="l1"), torch.tensor([[0.5, 1, 2, 3], [1, float("nan"), 0, 0], [2, 2, 2, 2],
                                                         [float("nan")] * 4, [0, 0, 0, 0], [-1, 1, -1, 1]])),
], ids=["classification", "multilabel", "mse", "l1"])
def test_masked_loss_and_gradient_equal_the_loss_on_the_labelled_samples_alone(task, target):
    """The losses mask instead of indexing (no host sync); value and gradient must equal the loss
    computed on the labelled samples only, and unlabelled samples (NaN labels included) must get
    exactly zero, finite gradient."""
    torch.manual_seed(0)
    output = torch.randn(6, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(task.loss(output, target), output)
    functional = torch.nn.functional
    if isinstance(task, ClassificationTask):
        rows = target != -100
        reference = functional.cross_entropy(output[rows], target[rows], label_smoothing=0.1)
    elif isinstance(task, MultiLabelTask):
        entries = ~torch.isnan(target) & (target >= 0)
        rows = entries.any(1)
        reference = functional.binary_cross_entropy_with_logits(output[entries], target[entries])
    else:
        rows = ~torch.isnan(target).any(1)
        reference = (functional.mse_loss if task.loss_fn == "mse" else functional.l1_loss)(output[rows], target[rows])
    (expected,) = torch.autograd.grad(reference, output)
    assert torch.allclose(task.loss(output, target), reference, atol=1e-6)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, expected, atol=1e-7)
    assert grad[~rows].abs().sum() == 0


def test_head_output_size_mismatch_names_task():
    task = ClassificationTask("left", 10)
    with pytest.raises(TaskConfigError, match="Task 'left'.*expects \\(batch, 10\\)"):
        task.check_output(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))


def test_label_out_of_range_names_task():
    task = ClassificationTask("left", 3)
    with pytest.raises(TaskConfigError, match="Task 'left': label 5"):
        task.check_output(torch.zeros(2, 3), torch.tensor([0, 5]))


def test_float_labels_for_classification_rejected():
    with pytest.raises(TaskConfigError, match="integer"):
        ClassificationTask("c", 3).check_output(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


def test_missing_label_key_names_task_and_keys():
    task = ClassificationTask("left", 10, label_key="left_digit")
    with pytest.raises(KeyError, match="Task 'left'.*'left_digit'.*\\['input', 'right'\\]"):
        task.get_target({"input": torch.zeros(1), "right": torch.zeros(1)})


def test_baseline_for_unknown_metric_rejected():
    with pytest.raises(TaskConfigError, match="unknown metric.*'rmse'"):
        RegressionTask("y", baselines={"rmse": 1.0})


def test_default_head_shapes():
    head = ClassificationTask("c", 4, head_hidden=(8,)).build_head(16)
    assert head(torch.zeros(2, 16)).shape == (2, 4)
    assert RegressionTask("r", num_outputs=3).build_head(5)(torch.zeros(1, 5)).shape == (1, 3)
