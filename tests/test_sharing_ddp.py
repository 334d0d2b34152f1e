"""Every new architecture under DDP (2 gloo processes on half batches) with a gradient method and
the negative-transfer monitor: the ranks agree, and agree with one process on the full batches."""

from __future__ import annotations

import pytest
import torch

from ddp_architecture_worker import ARCHITECTURES
from helpers import run_ddp_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ddp_worker("ddp_architecture_worker.py", tmp_path_factory.mktemp("ddp_architectures"))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ddp_matches_one_process_with_gradient_method_and_monitor(results, name):
    (ref_params, ref_cosine), (p0, c0), (p1, c1) = (results[r][name] for r in ("reference", "rank0", "rank1"))
    torch.testing.assert_close(p0, p1, rtol=0, atol=0)
    torch.testing.assert_close(p0, ref_params, rtol=0, atol=1e-5)
    assert ref_cosine.abs().sum() > 0  # the monitor measured
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)
    torch.testing.assert_close(c0, ref_cosine, rtol=1e-4, atol=1e-5)
