"""Every docstring example of the method packages runs as a doctest.

The examples are the ``>>>`` blocks in the docstrings of ``mtl_lightning.balancing``,
``mtl_lightning.gradients``, ``mtl_lightning.architectures`` and ``mtl_lightning.metrics``, and of the method registry (rendered
on the docs site). Each docstring is one test; a wrong printed value fails it.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

PACKAGES = ("mtl_lightning.balancing", "mtl_lightning.gradients", "mtl_lightning.architectures", "mtl_lightning.metrics")
MODULES = ("mtl_lightning.registry",)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = list(MODULES)
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        names.extend(info.name for info in pkgutil.iter_modules(pkg.__path__, package + "."))
    return names


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: list[doctest.DocTest] = []
    seen: set[tuple[str, int]] = set()
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            # Re-exported classes are found again through their package: keep each docstring once.
            key = (test.filename or "", test.lineno or 0)
            if test.examples and key not in seen:
                seen.add(key)
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = _examples()


def test_the_method_packages_have_examples() -> None:
    names = {t.name.rpartition(".")[2] for t in EXAMPLES}
    for expected in ("FAMO", "UW", "DWA", "MGDA", "NashMTL", "GradDrop", "MMoE", "MTAN"):
        assert expected in names, f"no docstring example for {expected}"


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example(test: doctest.DocTest) -> None:
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    output: list[str] = []
    try:
        runner.run(test, out=output.append, clear_globs=True)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(state)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(output)
