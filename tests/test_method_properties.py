"""The properties each gradient method's paper promises, checked for every registered method.

In the style of TorchJD's aggregator tests: the methods come from the registry
(:mod:`mtl_lightning.registry`), each test runs on the methods whose class declares the property
(``promises``, ``scale_exponent``; see ``mtl_lightning.gradients.base.PROPERTIES``), so a new method
joins the suite by being exported, and a property a method lacks is declared on its class. Every
method gets fresh instances (no state carried between the compared calls) and a fixed Jacobian.
"""

from __future__ import annotations

import pkgutil
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from torch import Tensor

import mtl_lightning.gradients as gradients_package
from mtl_lightning.gradients.base import PROPERTIES, GradientBalancer
from mtl_lightning.registry import balancing_methods, gradient_methods, lookup

METHODS = gradient_methods()


def promising(prop: str) -> list:
    return [pytest.param(cls, id=name) for name, cls in METHODS.items() if prop in cls.promises]


def aggregate(method: GradientBalancer, jac: Tensor, losses: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(d, w) of ``method`` on the Jacobian ``jac`` (T, P) through its real ``aggregate``, with the
    Gramian the engine would hand it (float32 products in float64; exact float64 ones for a float64
    J, so that the properties hold to float64 precision). A rep-only method sees J as the
    representation gradient of one sample with positive features."""
    t, p = jac.shape
    losses = torch.ones(t, dtype=torch.float64) if losses is None else losses
    blocks, ctx = [jac.clone()], None
    if "param" not in method.supported_modes:
        blocks = [jac.clone().reshape(t, 1, p)]
        ctx = SimpleNamespace(features=torch.ones(1, p, dtype=jac.dtype), reduce_mean=lambda x: x)
    gramian = None
    if method.uses_gramian:
        gramian = jac @ jac.T if jac.dtype == torch.float64 else GradientBalancer._gramian(blocks, None)
    (d,), w = method.aggregate(blocks, gramian, losses, None, ctx)
    return d.reshape(-1), w


def conflicting_jacobian(t: int, p: int = 10, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(t, p, generator=gen, dtype=torch.float64)
    jac[1] = -0.7 * jac[0] + 0.4 * jac[1]  # a conflicting pair
    return jac * torch.tensor([1.0, 3.0, 0.2, 1.5, 0.7, 2.0][:t], dtype=torch.float64).unsqueeze(1)


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


# ----------------------------------------------------------------------------------- the registry
def test_registry_lists_every_method_module_and_only_known_properties():
    # Every module of mtl_lightning.gradients but the machinery defines one registered method.
    machinery = {"base", "solvers", "torchjd_adapter"}
    modules = [m.name for m in pkgutil.iter_modules(gradients_package.__path__) if m.name not in machinery]
    defined = {cls.__module__.rpartition(".")[2] for cls in METHODS.values()}
    assert sorted(defined) == sorted(modules)
    for name, cls in METHODS.items():
        assert cls.promises <= set(PROPERTIES), (name, cls.promises - set(PROPERTIES))
        assert lookup(name) is cls
    assert {"EqualWeighting", "FAMO", "NashMTL", "UPGrad"} <= set(balancing_methods())
    assert "EW" not in balancing_methods() and "GradientBalancer" not in balancing_methods()
    assert "TorchJDWeighting" not in balancing_methods()  # an adapter: a method once given a weighting


def test_every_registered_gradient_method_builds_with_defaults_and_has_a_docstring_example():
    for name, cls in METHODS.items():
        assert cls.__doc__ and ">>>" in cls.__doc__, f"{name} has no docstring example"
        assert cls().name == name


# --------------------------------------------------------------------------------- the properties
@pytest.mark.parametrize("cls", promising("permutation_equivariant"))
@pytest.mark.parametrize("t", [3, 5])
def test_permuting_the_tasks_permutes_the_weights(cls, t):
    jac = conflicting_jacobian(t)
    losses = torch.linspace(0.5, 2.0, t, dtype=torch.float64)
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(t))
    d, w = aggregate(cls(), jac, losses)
    d_perm, w_perm = aggregate(cls(), jac[perm], losses[perm])
    torch.testing.assert_close(w_perm, w[perm], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d_perm, d, rtol=1e-6, atol=1e-9 * float(d.norm()))


@pytest.mark.parametrize("cls", promising("single_task_gradient"))
def test_one_task_gives_a_positive_multiple_of_its_gradient(cls):
    g = conflicting_jacobian(2)[:1]
    d, _ = aggregate(cls(), g)
    assert float(d.norm()) > 0 and cosine(d, g[0]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("cls", promising("identical_gradients"))
def test_identical_gradients_give_their_common_direction(cls):
    g = conflicting_jacobian(2)[0]
    d, _ = aggregate(cls(), g.expand(3, -1).clone())
    assert float(d.norm()) > 0 and cosine(d, g) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("cls", promising("non_conflicting"))
@pytest.mark.parametrize("t,seed", [(2, 0), (3, 1), (5, 2), (5, 3)])
def test_no_task_gradient_conflicts_with_the_update(cls, t, seed):
    jac = conflicting_jacobian(t, seed=seed)
    method = cls()
    d, w = aggregate(method, jac)
    assert float(d.norm()) > 0
    # A method solving on M/tr(M) + εI (UPGrad, DualProj: TorchJD's reg_eps) guarantees g_t·d ≥ −ε·tr(M)·w_t
    # (its KKT conditions); the others g_t·d ≥ 0, up to rounding.
    slack = (getattr(method, "reg_eps", 0.0) + 1e-12) * float(jac.square().sum()) * w.abs()
    assert bool((jac @ d >= -slack).all()), ((jac @ d).tolist(), slack.tolist())


@pytest.mark.parametrize("cls", promising("task_scale_invariant_direction"))
def test_rescaling_each_task_leaves_the_direction(cls):
    jac = conflicting_jacobian(4)
    d, _ = aggregate(cls(), jac)
    scales = torch.tensor([10.0, 0.1, 3.0, 0.5], dtype=torch.float64).unsqueeze(1)
    d_scaled, _ = aggregate(cls(), jac * scales)
    assert cosine(d_scaled, d) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("cls", [pytest.param(c, id=n) for n, c in METHODS.items() if c().scale_exponent is not None])
@pytest.mark.parametrize("c", [7.0, 0.01])  # small gradients: where a clipped step is not clipped
def test_common_rescaling_follows_the_papers_scaling_law(cls, c):
    """g_t → c·g_t gives d → c^k·d with the method's k: 1 for a weighting invariant to a common scale,
    0 for Nash-MTL (the update does not change), (1 − α)/(1 + α) for FairGrad."""
    jac = conflicting_jacobian(4)
    losses = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    method = cls()
    d, _ = aggregate(method, jac, losses)
    d_scaled, _ = aggregate(cls(), c * jac, losses)
    expected = c**method.scale_exponent * d
    # The official codes' 1e-8 guards (CAGrad's ‖g_0‖ + 1e-8, DB-MTL's ‖ĝ_t‖ + 1e-8) move the update by
    # ~1e-5 relative at c = 0.01; a wrong law is off by a factor (Nash-MTL's used to be 100×).
    torch.testing.assert_close(d_scaled, expected, rtol=1e-4, atol=1e-6 * float(expected.norm()))


# -------------------------------------------------------------------------- degenerate Jacobians
def _degenerate() -> dict[str, Tensor]:
    g = conflicting_jacobian(3, p=6, seed=7)
    return {
        "zero": torch.zeros(3, 6, dtype=torch.float64),
        "rank one": torch.outer(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), g[0]),
        "opposite": torch.stack([g[0], -g[0]]),
        "duplicated tasks": torch.stack([g[0], g[1], g[0], g[1]]),
        "one zero task": torch.stack([g[0], torch.zeros_like(g[0]), g[2]]),
        "scale 1e15": g * 1e15,
        "scale 1e-15": g * 1e-15,
        "scales 1e15 and 1e-15": g * torch.tensor([1e15, 1.0, 1e-15], dtype=torch.float64).unsqueeze(1),
        "opposite pair and a third": torch.stack([g[0], -g[0], g[2]]),
        "more tasks than dimensions": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]], dtype=torch.float64),
    }


DEGENERATE = _degenerate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("cls", [pytest.param(c, id=n) for n, c in METHODS.items()])
def test_degenerate_jacobians_give_finite_updates(cls, case, dtype):
    """Zero, rank-one, opposite and duplicated task gradients and extreme scales happen in real runs:
    no method may raise or return a non-finite update, in any training dtype (the second call runs
    from the state and warm start the first one left)."""
    jac = DEGENERATE[case].to(dtype)
    method = cls()
    for _ in range(2):
        d, w = aggregate(method, jac)
        assert d.dtype == dtype
        assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(w).all()), (d, w)


def test_the_docs_method_table_has_a_row_per_registered_method():
    from pathlib import Path

    table = (Path(__file__).parent.parent / "docs" / "balancing.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().split()[0].strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert set(balancing_methods()) <= rows, sorted(set(balancing_methods()) - rows)
