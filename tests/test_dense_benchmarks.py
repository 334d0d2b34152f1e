"""Dense tasks, SegNet / SegNet-MTAN and the NYUv2 / Cityscapes data modules, on tiny fixtures written
in the MTAN release's exact .npy layout; every shipped config runs end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl_lightning import MultiTaskModule
from mtl_lightning.architectures import SegNet, SegNetMTAN, check_roles
from mtl_lightning.cli import MTLCLI
from mtl_lightning.data import CityscapesDataModule, NYUv2DataModule
from mtl_lightning.data.dense import DenseNpyDataset
from mtl_lightning.tasks import DepthTask, NormalTask, SegmentationTask, TaskConfigError

from helpers import write_dense_fixture as write_fixture

ROOT = Path(__file__).parent.parent / "experiments"
H, W = 16, 32  # the fixture's image size


def test_dataset_reads_the_layout_channels_first():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = write_fixture(Path(tmp))
        dm = NYUv2DataModule(str(root), augmentation=False)
        dm.setup()
        sample = dm.datasets["train"][1]
        raw = np.load(root / "train" / "normal" / "1.npy")
        assert sample["input"].shape == (3, H, W) and sample["depth"].shape == (1, H, W)
        assert sample["segmentation"].dtype == torch.long and sample["segmentation"].shape == (H, W)
        assert torch.equal(sample["normal"], torch.from_numpy(np.moveaxis(raw, -1, 0)))
        assert len(dm.datasets["val"]) == 4 and dm.datasets["val"] is dm.datasets["test"]
        batch = next(iter(dm.val_dataloader()))
        assert batch["input"].shape == (2, 3, H, W)


def test_augmentation_is_seeded_by_epoch_and_image_and_keeps_geometry(tmp_path):
    root = write_fixture(tmp_path)
    folders = {"input": "image", "segmentation": "label", "depth": "depth", "normal": "normal"}
    kinds = {"input": "image", "segmentation": "label", "depth": "depth", "normal": "normal"}
    data = DenseNpyDataset(str(root / "train"), folders, kinds, augment=True, seed=3)
    plain = DenseNpyDataset(str(root / "train"), folders, kinds, augment=False)
    a, b = data[(0, 2)], data[(0, 2)]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same (seed, epoch, image): same draw
    draws = [data[(epoch, 2)] for epoch in range(12)]
    assert any(not torch.equal(d["input"], a["input"]) for d in draws)
    assert torch.equal(data[2]["input"], plain[2]["input"])  # evaluation (plain index): no augmentation
    original = plain[2]
    flips = scales = 0
    for d in draws:
        assert d["input"].shape == (3, H, W) and d["segmentation"].dtype == torch.long
        assert set(d["segmentation"].unique().tolist()) <= set(original["segmentation"].unique().tolist())
        if torch.equal(d["input"], original["input"].flip(-1)):  # scale 1, flipped: x of the normal negated
            flips += 1
            assert torch.equal(d["normal"][0], -original["normal"][0].flip(-1))
            assert torch.equal(d["normal"][1:], original["normal"][1:].flip(-1))
        depth_ratio = original["depth"][original["depth"] > 0].max() / d["depth"][d["depth"] > 0].max()
        scales += bool(depth_ratio > 1.1)  # depth divided by the crop's scale
    assert flips >= 1 and scales >= 1


def test_layout_errors_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no train/ or val/ folder.*train/\{image, label, depth, normal\}"):
        NYUv2DataModule(str(tmp_path / "missing")).setup()
    root = write_fixture(tmp_path / "gap")
    (root / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(ValueError, match="3.npy is missing"):
        NYUv2DataModule(str(root)).setup()
    root = write_fixture(tmp_path / "shape")
    np.save(root / "train" / "depth" / "0.npy", np.zeros((H, W, 2), np.float32))
    with pytest.raises(ValueError, match=r"depth map must be \(H, W, 1\)"):
        NYUv2DataModule(str(root)).setup()
    with pytest.raises(ValueError, match="tasks\\['seg'\\] = 'segmentation'"):
        CityscapesDataModule(str(root), tasks={"seg": "segmentation"})
    bad = tmp_path / "pickle"
    write_fixture(bad)
    np.save(bad / "train" / "image" / "0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):  # object arrays are refused, never unpickled
        NYUv2DataModule(str(bad)).setup()


def test_dense_losses_mask_unlabelled_pixels_as_numpy_does():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 4, 6, generator=g), torch.randint(-1, 5, (2, 4, 6), generator=g)
    keep = labels >= 0
    log_p = F.log_softmax(logits, 1).permute(0, 2, 3, 1)[keep]
    ce = -log_p[torch.arange(len(log_p)), labels[keep]].mean()
    assert SegmentationTask("s", num_classes=5).loss(logits, labels) == pytest.approx(float(ce), rel=1e-6)
    depth_t, depth_p = torch.rand(2, 1, 4, 6, generator=g), torch.rand(2, 1, 4, 6, generator=g)
    depth_t[0, 0, :2] = 0.0
    depth_t[1, 0, 0, 0] = float("nan")
    valid = (depth_t != 0) & torch.isfinite(depth_t)
    assert float(DepthTask("d").loss(depth_p, depth_t)) == pytest.approx(float((depth_p - depth_t)[valid].abs().mean()), rel=1e-6)
    normal_t = F.normalize(torch.randn(2, 3, 4, 6, generator=g), dim=1)
    normal_t[:, :, 0] = 0.0
    normal_p = torch.randn(2, 3, 4, 6, generator=g)
    cos = (F.normalize(normal_p, dim=1) * normal_t).sum(1)[:, 1:]
    assert float(NormalTask("n").loss(normal_p, normal_t)) == pytest.approx(1 - float(cos.mean()), rel=1e-6)
    assert NormalTask("n").valid_mask(normal_t).sum() == 2 * 3 * 6


def test_dense_shape_errors_name_the_task():
    task = SegmentationTask("seg", num_classes=5)
    with pytest.raises(TaskConfigError, match="'seg'.*expects \\(batch, 5, height, width\\)"):
        task.check_output(torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(TaskConfigError, match="'depth'.*expected labels \\(2, 1, 8, 8\\)"):
        DepthTask("depth").check_output(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        SegNet(filters=(4, 8, 8))(torch.zeros(1, 3, 12, 16))


def test_segnet_mtan_has_the_published_size_and_roles():
    # The official SegNet-MTAN and SegNet split (experiments/nyuv2/models.py of the Nash-MTL code) have
    # these sizes; loading the official model's weights into these classes gave identical outputs.
    tasks = lambda: [SegmentationTask("segmentation", num_classes=13), DepthTask("depth"), NormalTask("normal")]
    assert sum(p.numel() for p in MultiTaskModule(SegNetMTAN(), tasks()).parameters()) == 44_229_073
    assert sum(p.numel() for p in MultiTaskModule(SegNet(), tasks()).parameters()) == 25_055_185
    small = MultiTaskModule(SegNetMTAN(filters=(4, 8, 8)), tasks())
    x = torch.randn(2, 3, 16, 32)
    batch = {"input": x, "segmentation": torch.randint(-1, 13, (2, 16, 32)), "depth": torch.rand(2, 1, 16, 32),
             "normal": F.normalize(torch.randn(2, 3, 16, 32), dim=1)}
    reached = check_roles(small, batch)
    own = [n for n, tasks_reached in reached.items() if "_att." in n and "block_att" not in n]
    assert own and all(len(reached[n]) == 1 and n.split(".")[2] in reached[n] for n in own)
    with pytest.raises(ValueError, match="last two levels"):
        SegNetMTAN(filters=(4, 8, 16))


CONFIGS = sorted(str(p.relative_to(ROOT)) for d in ("nyuv2", "cityscapes") for p in (ROOT / d).glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_runs_end_to_end(config, tmp_path, monkeypatch):
    benchmark = config.split("/")[0]
    root = write_fixture(tmp_path / "data", classes=13 if benchmark == "nyuv2" else 7, normals=benchmark == "nyuv2",
                         label_folder="label" if benchmark == "nyuv2" else "label_7")
    monkeypatch.chdir(tmp_path)
    deeplab = "deeplab" in config  # LibMTL's protocol: a config of its own, a ResNet-50 (narrowed here)
    configs = [config] if deeplab else [f"{benchmark}/ew.yaml"] + ([config] if not config.endswith("ew.yaml") else [])
    shrink = ["--model.encoder.init_args.width", "4"] if deeplab else ["--model.encoder.init_args.filters", "[4, 8, 8]"]
    args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / c))] + [
        "--data.init_args.root", str(root), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
        "--data.init_args.batch_size", "3", *shrink,
    ]
    cli = MTLCLI(args=args, run_summary=False)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 4
    if deeplab:  # Δp against the first validation; the best-Δp epoch is checkpointed
        base = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FirstValidationBaselines").baselines
        assert base is not None and set(base) == set(cli.model.tasks)
        assert all(cli.model.tasks[n].baselines == v for n, v in base.items())
        assert torch.isfinite(metrics["val/delta_mtl"]) and list(tmp_path.rglob("best-epoch=*.ckpt"))
        return
    assert torch.isfinite(metrics["val_last10/delta_m"]) and 0 <= float(metrics["val/segmentation/miou"]) <= 1
    averaged = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LastEpochsAverage")
    first, second = (r["depth"]["abs_err"] for r in averaged.history)
    assert float(metrics["val_last10/depth/abs_err"]) == pytest.approx((first + second) / 2)
