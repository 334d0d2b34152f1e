"""Every package imports first in a fresh interpreter, and the layers depend one way: the core
knows nothing of balancing, monitoring, Lightning glue or the CLI; balancing and gradients nothing
of monitoring or the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "mtl_lightning"

# package -> packages of mtl_lightning it must not import at module level (a command's entry point,
# such as monitoring.baselines, may import the CLI inside its function)
FORBIDDEN = {
    "core": {"balancing", "gradients", "monitoring", "models", "data", "cli", "tracking", "toy"},
    "architectures": {"balancing", "gradients", "monitoring", "models", "cli", "toy"},
    "gradients": {"monitoring", "cli", "toy", "data"},
    "balancing": {"monitoring", "cli", "toy", "data"},
    "monitoring": {"cli", "toy"},
}


@pytest.mark.parametrize("module", ["mtl_lightning.core", "mtl_lightning.gradients", "mtl_lightning.balancing",
                                    "mtl_lightning.monitoring", "mtl_lightning.architectures", "mtl_lightning.__main__"])
def test_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" not in proc.stdout + proc.stderr  # importing __main__ must not run the CLI


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mtl_lightning" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = {}
    for path in sorted((PACKAGE / package).glob("*.py")):
        hit = _imported_packages(path) & FORBIDDEN[package]
        if hit:
            bad[path.name] = sorted(hit)
    assert not bad, f"mtl_lightning.{package} imports layers above it: {bad}"
