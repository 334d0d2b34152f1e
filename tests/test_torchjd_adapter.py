"""TorchJD's weightings as gradient methods: the adapter's update equals TorchJD's own aggregation."""

from __future__ import annotations

import sys

import pytest
import torch

from gradient_helpers import make_batches, train
from mtl_lightning.gradients import TorchJDWeighting, UPGrad

aggregation = pytest.importorskip("torchjd.aggregation")


def jacobian(t: int, p: int = 11, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(t, p, generator=gen, dtype=torch.float64)
    jac[1] = -0.7 * jac[0] + 0.3 * jac[1]
    return jac


def adapter_direction(method: TorchJDWeighting, jac: torch.Tensor) -> torch.Tensor:
    """The update through the adapter's ``aggregate``, J split into two parameter blocks."""
    blocks = [jac[:, :4].clone(), jac[:, 4:].clone().reshape(jac.shape[0], -1, 1)]
    gramian = method._gramian(blocks, None) if method.uses_gramian else None
    first, second = method.aggregate(blocks, gramian, torch.ones(jac.shape[0]), None, None)[0]
    return torch.cat([first, second.reshape(-1)])


GRAMIAN_CASES = {
    "UPGrad": ("UPGradWeighting", aggregation.UPGrad),
    "DualProj": ("DualProjWeighting", aggregation.DualProj),
    "MGDA": ("MGDAWeighting", aggregation.MGDA),
    "IMTLG": ("IMTLGWeighting", aggregation.IMTLG),
    "AlignedMTL": ("AlignedMTLWeighting", aggregation.AlignedMTL),
    "Mean": ("MeanWeighting", aggregation.Mean),
}


@pytest.mark.parametrize("case", list(GRAMIAN_CASES))
@pytest.mark.parametrize("t", [2, 4])
def test_gramian_weightings_give_torchjds_aggregation(case, t):
    name, aggregator = GRAMIAN_CASES[case]
    jac = jacobian(t, seed=t)
    expected = aggregator()(jac)
    # The adapter's Gramian is the engine's (float32 products): agreement to float32 precision.
    torch.testing.assert_close(adapter_direction(TorchJDWeighting(name), jac), expected, rtol=1e-5, atol=1e-6)


def test_a_matrix_weighting_gets_the_jacobian_and_keeps_its_state():
    """ExcessMTL weighs the tasks from J itself and from its running statistics, over steps."""
    method = TorchJDWeighting(aggregation.ExcessMTLWeighting(), stat="matrix")
    reference = aggregation.ExcessMTL()
    for step in range(3):
        jac = jacobian(3, seed=10 + step)
        torch.testing.assert_close(adapter_direction(method, jac), reference(jac), rtol=1e-10, atol=1e-12)
    assert "weighting" in method.state_dict()


def test_the_adapter_trains_like_the_built_in_method():
    batches = make_batches(3, 16)
    built_in = train(UPGrad(), batches)
    adapted = train(TorchJDWeighting("UPGradWeighting"), batches)
    torch.testing.assert_close(adapted, built_in, rtol=0, atol=1e-4)


def test_bad_weighting_names_and_missing_torchjd_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="'Nope' is not a weighting of torchjd.aggregation"):
        TorchJDWeighting("Nope")
    with pytest.raises(ValueError, match="stat="):
        TorchJDWeighting("MeanWeighting", stat="jacobian")
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    with pytest.raises(ImportError, match=r"pip install 'mtl-lightning\[torchjd\]'"):
        TorchJDWeighting("MeanWeighting")
