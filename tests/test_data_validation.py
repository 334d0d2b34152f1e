"""Bad data is caught at set-up, by name: a task without a labelled training sample, a label outside
its task's range in any split, an empty split, a bad ``missing_labels``, a head built for another
input size; the monitor and the architecture heatmaps without matplotlib; the errors through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import wandb
from torch import nn
from torch.utils.data import Dataset

from helpers import quiet_trainer
from mtl_lightning.cli import TRACEBACK_ENV, main
from mtl_lightning.data import MultiDatasetDataModule, MultiDigitsDataModule, MultiTaskDataModule, TensorDictDataset
from mtl_lightning.data.datamodule import dataset_labels
from mtl_lightning.models import MultiTaskModule, SmallCNN
from mtl_lightning.models.encoders import MLP
from mtl_lightning.monitoring import NegativeTransferMonitor
from mtl_lightning.tasks import ClassificationTask, MultiLabelTask, RegressionTask, TaskConfigError

pytestmark = pytest.mark.one_thread

ROOT = Path(__file__).resolve().parents[1]
EW = str(ROOT / "experiments" / "multidigits" / "ew.yaml")
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--data.init_args.num_train", "64", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


class TinyData(MultiTaskDataModule):
    """In-memory splits ``{split: {key: tensor}}``."""

    def __init__(self, splits: dict[str, dict[str, torch.Tensor]], batch_size: int = 8) -> None:
        super().__init__(batch_size)
        self.splits = splits

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        return {split: TensorDictDataset(tensors) for split, tensors in self.splits.items()}


def _splits(n: int = 64, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split in ("train", "val", "test"):
        out[split] = {
            "input": torch.randn(n, 4, generator=g),
            "cls": torch.randint(3, (n,), generator=g),
            "tags": torch.randint(2, (n, 5), generator=g).float(),
            "reg": torch.randn(n, 2, generator=g),
        }
    return out


def _tasks() -> list:
    return [ClassificationTask("cls", 3), MultiLabelTask("tags", 5), RegressionTask("reg", num_outputs=2)]


def _fit(data: MultiTaskDataModule, tasks=None, **trainer_kwargs) -> MultiTaskModule:
    model = MultiTaskModule(MLP(4, (16,)), tasks or _tasks())
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, **trainer_kwargs)
    try:
        trainer.fit(model, datamodule=data)
    finally:
        model.steps_taken = trainer.global_step  # type: ignore[attr-defined]
    return model


# ---------------------------------------------------------------------------------------- labels
def test_all_nan_regression_labels_name_the_task_and_split():
    splits = _splits()
    splits["train"]["reg"] = torch.full((64, 2), float("nan"))
    with pytest.raises(TaskConfigError, match=r"Task 'reg': no labelled sample in the train split of TinyData \(all 64"):
        _fit(TinyData(splits))


def test_missing_labels_of_one_leave_no_labelled_sample():
    data = MultiDigitsDataModule(num_train=64, num_val=16, num_test=16, missing_labels={"right": 1.0})
    model = MultiTaskModule(SmallCNN(out_features=16), [ClassificationTask("left", 10), ClassificationTask("right", 10)])
    with pytest.raises(TaskConfigError, match=r"Task 'right': no labelled sample in the train split of MultiDigitsDataModule"):
        quiet_trainer(num_sanity_val_steps=0).fit(model, datamodule=data)


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan"), "half"])
def test_missing_labels_outside_zero_one_is_refused(rate):
    with pytest.raises(ValueError, match=r"missing_labels\['right'\] = .* must be a fraction in \[0, 1\] .* of task 'right'"):
        MultiDigitsDataModule(missing_labels={"right": rate})


def test_missing_labels_naming_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match=r"missing_labels names unknown task\(s\) \['middle'\]"):
        MultiDigitsDataModule(missing_labels={"middle": 0.3})


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_out_of_range_class_label_anywhere_is_caught_before_training(split):
    splits = _splits(256)
    splits[split]["cls"][-1] = 5  # the last sample: far past the first batch (batch size 8)
    model = MultiTaskModule(MLP(4, (16,)), _tasks())
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.raises(TaskConfigError, match=rf"Task 'cls': label 5 in the {split} split of TinyData is outside \[0, 3\) "
                                              r"and not the missing-label value ignore_index=-100\.$"):
        trainer.fit(model, datamodule=TinyData(splits))
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tags", torch.full((64, 5), 2.0), r"Task 'tags': 320 labels in the val split of TinyData are neither 0 nor 1 .*: values 2\.$"),
        ("tags", torch.zeros(64, 4), r"Task 'tags': multi-label targets must have shape \(batch, 5\), got \(64, 4\) in the val split"),
        ("reg", torch.zeros(64, 3), r"Task 'reg': regression labels have 3 values per sample in the val split .*num_outputs=2"),
        ("reg", torch.full((64, 2), float("inf")), r"Task 'reg': 128 labels in the val split of TinyData are infinite .*values inf"),
        ("cls", torch.zeros(64, 2, dtype=torch.long), r"Task 'cls': classification labels must be a 1-D integer tensor"),
        ("cls", torch.arange(64) % 10 - 1, r"Task 'cls': 43 labels in the val split of TinyData are outside \[0, 3\) .*"
                                           r"ignore_index=-100: values -1, 3, 4, 5, 6, …\.$"),
    ],
    ids=["multilabel_value", "multilabel_width", "regression_width", "regression_inf", "class_shape", "class_values"],
)
def test_label_formats_are_checked_by_each_task(key, value, message):
    splits = _splits()
    splits["val"][key] = value
    with pytest.raises(TaskConfigError, match=message):
        _fit(TinyData(splits))


def test_valid_data_with_missing_labels_passes():
    splits = _splits()
    train = splits["train"]
    train["cls"][::2] = -100  # ignore_index
    train["tags"][::3] = -1.0  # a missing row
    train["tags"][1, 2] = float("nan")  # a missing entry
    train["reg"][1::2] = float("nan")
    model = _fit(TinyData(splits))
    assert model.steps_taken == 2  # type: ignore[attr-defined]
    tasks = {t.name: t for t in _tasks()}
    assert tasks["cls"].validate_labels(train["cls"], "train") == 32
    assert tasks["tags"].validate_labels(train["tags"], "train") == 64 - 22
    assert tasks["reg"].validate_labels(train["reg"], "train") == 32


def test_multidigits_with_partial_labels_of_every_kind_trains():
    data = MultiDigitsDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, aux_tasks=("present", "left_x1000"),
                                 missing_labels={"right": 0.5, "present": 0.5, "left_x1000": 0.5})
    tasks = [ClassificationTask("left", 10), ClassificationTask("right", 10), MultiLabelTask("present", 10),
             RegressionTask("left_x1000")]
    trainer = quiet_trainer(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(MultiTaskModule(SmallCNN(out_features=16), tasks), datamodule=data)
    assert trainer.global_step == 2


class Opaque(Dataset):
    """A dataset that cannot expose its labels cheaply: the checks must not read it."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return {"input": torch.zeros(4), "cls": torch.tensor(7)}


def test_datasets_without_label_tensors_are_skipped_without_reading_them():
    opaque = Opaque()
    assert dataset_labels(opaque, "cls") is None and opaque.reads == 0
    tensors = TensorDictDataset({"input": torch.zeros(6, 4), "cls": torch.arange(6)})
    assert dataset_labels(torch.utils.data.Subset(tensors, [4, 1]), "cls").tolist() == [4, 1]
    data = MultiDatasetDataModule(datasets={"cls": {"train": opaque, "val": opaque}})
    model = MultiTaskModule(MLP(4, (16,)), [ClassificationTask("cls", 3)])
    model._batch_layout = "routed"
    model._check_data(data, "fit")
    assert opaque.reads == 0


# ---------------------------------------------------------------------------------------- empty splits
def test_empty_split_names_the_data_module_and_split():
    splits = _splits()
    splits["val"] = {k: v[:0] for k, v in splits["val"].items()}
    with pytest.raises(ValueError, match=r"TinyData: the 'val' split is empty \(0 samples\)"):
        _fit(TinyData(splits))


def test_empty_split_of_one_task_dataset_names_the_task():
    def data(n):
        return TensorDictDataset({"input": torch.randn(n, 4), "a": torch.randint(3, (n,))})

    module = MultiDatasetDataModule(datasets={"a": {"train": data(32), "val": data(8), "test": data(0)}}, batch_size=8)
    with pytest.raises(ValueError, match=r"MultiDatasetDataModule: the 'test' split of task 'a' is empty"):
        quiet_trainer(limit_train_batches=2, num_sanity_val_steps=0).fit(
            MultiTaskModule(MLP(4, (16,)), [ClassificationTask("a", 3)]), datamodule=module)


def test_routed_labels_are_checked_per_task():
    def data(n, high):
        return TensorDictDataset({"input": torch.randn(n, 4), "a": torch.randint(high, (n,))})

    module = MultiDatasetDataModule(datasets={"a": {"train": data(32, 9), "val": data(8, 3)}}, batch_size=8)
    with pytest.raises(TaskConfigError, match=r"Task 'a': \d+ labels in the train split of MultiDatasetDataModule are outside \[0, 3\)"):
        quiet_trainer(num_sanity_val_steps=0).fit(MultiTaskModule(MLP(4, (16,)), [ClassificationTask("a", 3)]), datamodule=module)


# ---------------------------------------------------------------------------------------- heads
def test_head_for_another_input_size_is_refused_at_construction():
    with pytest.raises(TaskConfigError, match=r"Task 'cls': its head expects 32 input features, but the encoder MLP gives 16"):
        MultiTaskModule(MLP(4, (16,)), [ClassificationTask("cls", 3, head=nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3)))])


class Narrow(nn.Module):
    """Declares 32 output features but gives 16."""

    out_features = 32

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 16)

    def forward(self, x):
        return self.layer(x)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(32, 3)

    def forward(self, x):
        return self.inner(x)


def test_head_input_mismatch_when_applied_names_task_and_sizes():
    model = MultiTaskModule(Narrow(), [ClassificationTask("cls", 3), ClassificationTask("other", 3, head=Wide())])
    with pytest.raises(TaskConfigError, match=r"Task 'cls': its head expects 32 input features, but the encoder's features "
                                              r"have shape \(5, 16\) \(16 features\).*mat1 and mat2"):
        model(torch.randn(5, 4))
    model.heads["cls"] = nn.Linear(16, 3)
    with pytest.raises(TaskConfigError, match=r"Task 'other': its head \(Wide\) cannot be applied to the encoder's features of shape \(5, 16\)"):
        model(torch.randn(5, 4))


def test_other_head_errors_pass_through_unchanged():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("something else went wrong")

    model = MultiTaskModule(MLP(4, (16,)), [ClassificationTask("cls", 3, head=Broken())])
    with pytest.raises(RuntimeError, match="^something else went wrong$"):
        model(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------- plots
def _block_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("found", [False, True], ids=["not_installed", "broken_install"])
def test_monitor_without_matplotlib_writes_its_report_and_says_why_no_png(monkeypatch, tmp_path, found):
    _block_matplotlib(monkeypatch)
    if found:  # found at set-up but failing to import when drawing
        monkeypatch.setattr("mtl_lightning.monitoring.negative_transfer.plots_available", lambda: True)
    out = tmp_path / "nt"
    monitor = NegativeTransferMonitor(interval=1, output_dir=str(out))
    model = MultiTaskModule(MLP(4, (16,)), _tasks())
    trainer = quiet_trainer(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r'no heatmap PNG is written; the report .* pip install "mtl-lightning\[plots\]"'):
        trainer.fit(model, datamodule=TinyData(_splits()))
    report = json.loads((out / "negative_transfer_report.json").read_text())
    assert report["measurements"] >= 2
    assert any("mtl-lightning[plots]" in note for note in report["notes"])
    assert "mtl-lightning[plots]" in (out / "negative_transfer_report.md").read_text()
    assert not (out / "heatmaps").exists() or not list((out / "heatmaps").iterdir())


def test_architecture_heatmap_without_matplotlib_warns_once(monkeypatch, tmp_path):
    _block_matplotlib(monkeypatch)
    model = MultiTaskModule(MLP(4, (16,)), _tasks())
    with pytest.warns(UserWarning, match=r"'adjacency' heatmaps .* not written.*mtl-lightning\[plots\]") as record:
        model._save_matrix(torch.zeros(3, 3), "adjacency", str(tmp_path))
        model._save_matrix(torch.zeros(3, 3), "adjacency", str(tmp_path))
    assert len([w for w in record if "heatmaps" in str(w.message)]) == 1
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------------------------------- CLI
@pytest.fixture
def _quiet_cli(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv(TRACEBACK_ENV, "0")
    yield
    wandb.finish()


class NarrowCNN(SmallCNN):
    """Declares its ``out_features`` but gives half as many (a head input mismatch at the first batch)."""

    def __init__(self, out_features: int = 128) -> None:
        super().__init__(in_channels=1, image_size=12, out_features=out_features // 2)
        self.out_features = out_features


@pytest.mark.usefixtures("_quiet_cli")
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.init_args.missing_labels", "{right: 1.0}"],
         "error during set-up: TaskConfigError: Task 'right': no labelled sample in the train split of MultiDigitsDataModule"),
        (["--data.init_args.missing_labels", "{right: 1.5}"],
         "MultiDigitsDataModule: missing_labels['right'] = 1.5 must be a fraction in [0, 1]"),
        (["--model.encoder", f"{__name__}.NarrowCNN"],
         "error during fit: TaskConfigError: Task 'left': its head expects 128 input features, but the encoder's features "
         "have shape (32, 64) (64 features)"),
    ],
    ids=["no_labelled_sample", "missing_labels_1.5", "head_input"],
)
def test_data_errors_through_the_cli_are_one_message(capfd, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", EW, *TINY, "--data.init_args.eval_batch_size", "32", *args])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    assert expected in err, err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1, err
