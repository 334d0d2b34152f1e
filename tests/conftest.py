import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _chdir_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so run outputs (runs/, lightning_logs/) never collide."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_marked_modules(request):
    """Modules marked ``one_thread`` run on one intra-op thread: their small models train several
    times faster that way on 2 shared cores. The setting is restored afterwards."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
