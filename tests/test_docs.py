"""The README stays short, every relative link in the docs resolves, and the docs site builds cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 15_000  # bytes

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*(?:\{#([\w-]+)\})?\s*$")


def _prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def _links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path) for m in LINK.finditer(line)]


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "/"))


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """Heading ids of a Markdown page as mkdocs' toc extension makes them ({#id} wins)."""
    from markdown.extensions.toc import slugify

    ids = set()
    for line in _prose_lines(path):
        m = HEADING.match(line)
        if m:
            ids.add(m.group(3) or slugify(re.sub(r"[*_`]", "", m.group(2)), "-"))
    return ids


def test_readme_is_at_most_15_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} and move details to docs/."


def test_readme_keeps_the_ci_test_command() -> None:
    text = README.read_text(encoding="utf-8")
    assert "python -m pytest -q" in text
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if not _is_relative(target):
            continue
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if file_part and not (page.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_anchors_into_docs_exist() -> None:
    pytest.importorskip("markdown")
    broken = []
    for target in _links(README):
        if not _is_relative(target) or "#" not in target:
            continue
        file_part, anchor = target.split("#", 1)
        path = (ROOT / file_part) if file_part else README
        if path.suffix == ".md" and path.exists() and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"README.md links to missing anchors: {broken}"


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "WARNING" not in output, output[-6000:]
    assert (tmp_path / "site" / "balancing" / "index.html").exists()
