"""TimmEncoder: a timm backbone built with pretrained=False, its weights read from a local file, trained
through the CLI. Skipped where timm cannot be imported (it needs a torchvision built for the torch)."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import pytest
import torch

try:
    import timm
except Exception:  # ImportError, or a torchvision that does not match the torch build
    pytest.skip("timm is not importable here (the 'timm' extra, with a torchvision matching torch)", allow_module_level=True)

from mtl_lightning.cli import MTLCLI  # noqa: E402
from mtl_lightning.models import TimmEncoder  # noqa: E402

pytestmark = pytest.mark.one_thread

ROOT = Path(__file__).parent.parent
EW = str(ROOT / "experiments/multidigits/ew.yaml")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_come_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()  # a classifier checkpoint
    path = str(tmp_path / f"weights{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    encoder = TimmEncoder("resnet10t", pretrained_path=path).eval()
    fresh = TimmEncoder("resnet10t").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.allclose(encoder(x), expected, atol=1e-5)  # the classifier head is dropped
        assert not torch.allclose(fresh(x), expected, atol=1e-3)
    assert encoder.out_features == 512


def test_missing_or_mismatched_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="TimmEncoder: pretrained_path=.*nothing.pt"):
        TimmEncoder("resnet10t", pretrained_path=str(tmp_path / "nothing.pt"))
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "r10.pt")
    with pytest.raises(ValueError, match="does not fit 'resnet14t'"):
        TimmEncoder("resnet14t", pretrained_path=str(tmp_path / "r10.pt"))
    with pytest.raises(ValueError, match="features"):
        TimmEncoder("resnet10t", features="all")


def test_multiscale_features_list_every_stage():
    encoder = TimmEncoder("resnet10t", features="multiscale", in_chans=1)
    maps = encoder(torch.randn(2, 1, 12, 12))
    assert [m.shape[1] for m in maps] == encoder.out_channels and encoder.out_features is None


def test_timm_backbone_trains_through_the_cli(tmp_path):
    MTLCLI(args=[
        "fit", "--config", EW, "--model.encoder", "mtl_lightning.models.TimmEncoder",
        "--model.encoder.name", "resnet10t", "--model.encoder.in_chans", "1",
        "--data.init_args.num_train", "256", "--data.init_args.num_val", "64", "--data.init_args.num_test", "64",
        "--data.init_args.batch_size", "32", "--trainer.max_steps", "16", "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", ".",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
    ])
    path = sorted(glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True))[-1]
    losses = [float(r["train/loss_step"]) for r in csv.DictReader(open(path)) if r.get("train/loss_step")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
