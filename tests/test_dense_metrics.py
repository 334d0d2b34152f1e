"""Dense-task metrics against independent numpy implementations of the MTAN / Nash-MTL formulas, on
random inputs with unlabelled pixels; split into batches and across 2 DDP (gloo) processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl_lightning.metrics.dense import DepthMetrics, NormalMetrics, SegmentationMetrics

C = 7


def make_data(seed: int = 0, n: int = 6, h: int = 9, w: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seg_target = torch.randint(-1, C, (n, h, w), generator=g)  # -1: unlabelled
    seg_logits = torch.randn(n, C, h, w, generator=g)
    depth_target = torch.rand(n, 1, h, w, generator=g) * 5 + 0.5
    depth_target[torch.rand(n, 1, h, w, generator=g) < 0.3] = 0.0  # no depth
    depth_pred = depth_target + torch.randn(n, 1, h, w, generator=g) * 0.3
    normal_target = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normal_target[:, :, torch.rand(h, w, generator=g) < 0.2] = 0.0  # no normal
    normal_pred = normal_target + torch.randn(n, 3, h, w, generator=g) * 0.4
    return dict(seg_target=seg_target, seg_logits=seg_logits, depth_target=depth_target, depth_pred=depth_pred,
                normal_target=normal_target, normal_pred=normal_pred)


def numpy_segmentation(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(1)
    keep = (target >= 0) & (target < C)
    confusion = np.zeros((C, C))
    np.add.at(confusion, (target[keep], pred[keep]), 1)
    iou = [confusion[c, c] / (confusion[c, :].sum() + confusion[:, c].sum() - confusion[c, c]) for c in range(C)
           if confusion[c, :].sum() + confusion[:, c].sum() > 0]
    return {"miou": float(np.mean(iou)), "pixel_accuracy": float(np.trace(confusion) / confusion.sum())}


def numpy_depth(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    mask = target.sum(1) != 0
    p, y = pred[:, 0][mask], target[:, 0][mask]
    return {"abs_err": float(np.abs(p - y).mean()), "rel_err": float((np.abs(p - y) / y).mean())}


def numpy_normals(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    mask = np.linalg.norm(target, axis=1) != 0
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    error = np.degrees(np.arccos(np.clip((unit * target).sum(1)[mask], -1, 1)))
    return {"mean_angle": error.mean(), "median_angle": np.median(error), "within_11.25": np.mean(error < 11.25),
            "within_22.5": np.mean(error < 22.5), "within_30": np.mean(error < 30)}


def run_all(data: dict[str, torch.Tensor], chunks: int = 1) -> dict[str, float]:
    metrics = (SegmentationMetrics(C), DepthMetrics(), NormalMetrics())
    pairs = (("seg_logits", "seg_target"), ("depth_pred", "depth_target"), ("normal_pred", "normal_target"))
    for metric, (p, t) in zip(metrics, pairs):
        for pred, target in zip(data[p].chunk(chunks), data[t].chunk(chunks)):
            metric.update(pred, target)
    return {k: float(v) for m in metrics for k, v in m.compute().items()}


def reference(data: dict[str, torch.Tensor]) -> dict[str, float]:
    d = {k: v.double().numpy() if v.is_floating_point() else v.numpy() for k, v in data.items()}
    return {**numpy_segmentation(d["seg_logits"], d["seg_target"]), **numpy_depth(d["depth_pred"], d["depth_target"]),
            **numpy_normals(d["normal_pred"], d["normal_target"])}


def assert_matches(got: dict[str, float], want: dict[str, float], bin_width: float = 0.01) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        tol = bin_width / 2 + 1e-6 if key == "median_angle" else 1e-5
        assert got[key] == pytest.approx(value, abs=tol, rel=1e-5), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_numpy_references(seed):
    data = make_data(seed)
    assert_matches(run_all(data), reference(data))


def test_batches_of_unequal_valid_pixels_give_the_whole_set_metric():
    data = make_data(3, n=8)
    data["depth_target"][:2] = 0.0  # two images without any depth
    assert_matches(run_all(data, chunks=4), reference(data))
    assert_matches(run_all(data, chunks=4), run_all(data, chunks=1), bin_width=0.0)


def test_labels_ignored_out_of_range_and_absent_classes():
    metric = SegmentationMetrics(4, ignore_index=255)
    target = torch.tensor([[[0, 0, 255, 1]]])
    preds = torch.tensor([[[0, 1, 3, 1]]])  # class 2 absent everywhere: no IoU; class 3 predicted only on an ignored pixel
    out = metric(preds, target)
    assert float(out["pixel_accuracy"]) == pytest.approx(2 / 3)
    assert float(out["miou"]) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 3\).*\(2, 4, 4\)"):
        SegmentationMetrics(3).update(torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must both be"):
        NormalMetrics().update(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(1)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        data = make_data(4, n=6)
        shard = {k: v[rank * 3:(rank + 1) * 3] for k, v in data.items()}  # 3 images per rank
        result = run_all(shard)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_summed_across_two_ddp_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    data = make_data(4, n=6)
    assert_matches(got, reference(data))
    shard_only = run_all({k: v[:3] for k, v in data.items()})
    assert got["abs_err"] != pytest.approx(shard_only["abs_err"], rel=1e-6)  # rank 0 did see rank 1's sums
