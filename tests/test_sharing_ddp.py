"""Every new architecture under DDP (2 gloo processes on half batches) with a gradient method and
the negative-transfer monitor: the ranks agree, and agree with one process on the full batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_architecture_worker import ARCHITECTURES

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_architectures")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    proc = subprocess.run([sys.executable, str(HERE / "ddp_architecture_worker.py"), str(out), port], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: torch.load(out / f"{name}.pt") for name in ("reference", "rank0", "rank1")}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ddp_matches_one_process_with_gradient_method_and_monitor(results, name):
    (ref_params, ref_cosine), (p0, c0), (p1, c1) = (results[r][name] for r in ("reference", "rank0", "rank1"))
    torch.testing.assert_close(p0, p1, rtol=0, atol=0)
    torch.testing.assert_close(p0, ref_params, rtol=0, atol=1e-5)
    assert ref_cosine.abs().sum() > 0  # the monitor measured
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)
    torch.testing.assert_close(c0, ref_cosine, rtol=1e-4, atol=1e-5)
