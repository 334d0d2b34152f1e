import pytest

from mtl_lightning.metrics import delta_mtl, relative_gain


def test_relative_gain_directions():
    assert relative_gain(0.9, 0.8, True) == pytest.approx(12.5)
    assert relative_gain(0.9, 0.8, False) == pytest.approx(-12.5)


def test_delta_conventions_against_hand_computation():
    results = {"seg": {"miou": 0.44, "acc": 0.66}, "depth": {"abs": 0.5}}
    baselines = {"seg": {"miou": 0.40, "acc": 0.60}, "depth": {"abs": 0.4}}
    directions = {"seg": {"miou": True, "acc": True}, "depth": {"abs": False}}
    out = delta_mtl(results, baselines, directions)
    seg = (10.0 + 10.0) / 2  # +10% on both metrics
    depth = -25.0  # 0.5 vs 0.4, lower is better
    assert out.per_task == pytest.approx({"seg": seg, "depth": depth})
    assert out.delta_mtl == pytest.approx((seg + depth) / 2)  # Maninis: per task first
    assert out.delta_m == pytest.approx(-(10 + 10 - 25) / 3)  # Nash-MTL: flat over metrics, sign flipped


def test_delta_none_without_matching_tasks():
    assert delta_mtl({"a": {"m": 1.0}}, {"b": {"m": 1.0}}, {"b": {"m": True}}) is None
