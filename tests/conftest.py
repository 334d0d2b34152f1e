import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _chdir_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so run outputs (runs/, lightning_logs/) never collide."""
    monkeypatch.chdir(tmp_path)
