"""The gradient-method benchmark's TorchJD comparison compares like with like.

``experiments/benchmarks/gradient_methods.py`` times TorchJD's MTL step with the aggregator that
``torchjd_equivalents`` maps to each of our methods, built from our method's default options. Here each
mapped aggregator gives our method's update direction on fixed Jacobians (over several steps, for the
stateful ones), and TorchJD's step as the benchmark runs it gives every parameter the gradient our step
gives it, on the benchmark's own module.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mtl_lightning.registry import gradient_methods

aggregation = pytest.importorskip("torchjd.aggregation")

pytestmark = pytest.mark.one_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "gradient_methods_benchmark", os.path.join(REPO, "experiments", "benchmarks", "gradient_methods.py"))
assert _spec is not None and _spec.loader is not None
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

METHODS = gradient_methods()
EQUIVALENTS = benchmark.torchjd_equivalents()

#: Options TorchJD does not have, which scale the update (TorchJD's update = ours × factor): CAGrad's
#: ``rescale`` (ours divides by 1 + c²), Aligned-MTL's preference (TorchJD averages the aligned
#: gradients, ours sums them).
SCALE = {"CAGrad": lambda ours, t: 1 + ours.c ** 2, "AlignedMTL": lambda ours, t: 1 / t}

#: Methods whose partner order is random: ours and TorchJD draw different orders, so they are compared
#: where the order does not change the update (two tasks; two independent pairs of tasks).
ORDER_DEPENDENT = {"PCGrad", "GradVac"}

#: At T > 2 TorchJD's MGDA at its defaults (the benchmark's) stops Frank–Wolfe at γ < 1e-3 or 100
#: iterations, short of the min-norm point ours computes exactly; run to convergence, the same
#: solver reaches our point, which shows both solve the same problem.
CONVERGED = {"MGDA": lambda ours, t: aggregation.MGDA(epsilon=1e-8, max_iters=20_000)}

#: Agreement of the unit directions and of the scales: TorchJD solves CAGrad's and Nash-MTL's problems with
#: cvxpy, UPGrad's and DualProj's with quadprog, FairGrad's with scipy, to their default tolerances
#: (CAGrad's weights, for one, to about 1e-5).
TOLERANCE = 1e-4


def conflicting(t: int, seed: int) -> torch.Tensor:
    """T dense task gradients (11 parameters), the first two conflicting."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(t, 11, generator=gen, dtype=torch.float64)
    jac[1] = -0.7 * jac[0] + 0.3 * jac[1]
    return jac


def two_pairs(seed: int) -> torch.Tensor:
    """Four tasks in two conflicting pairs on disjoint parameters: no projection or correction of one
    pair involves the other, so the partner order does not matter."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.zeros(4, 12, dtype=torch.float64)
    for rows, cols, mix in ((slice(0, 2), slice(0, 6), -0.7), (slice(2, 4), slice(6, 12), -0.5)):
        pair = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        pair[1] = mix * pair[0] + 0.5 * pair[1]
        jac[rows, cols] = pair
    return jac


CASES = {
    "two tasks": lambda step: conflicting(2, seed=step),
    "two independent pairs": lambda step: two_pairs(seed=step),
    "three tasks": lambda step: conflicting(3, seed=10 + step),
}


def our_direction(method, jac: torch.Tensor) -> torch.Tensor:
    """Our update through ``aggregate``, as the engine gives J: one block per parameter (two here)."""
    blocks = [jac[:, :5].clone(), jac[:, 5:].clone().reshape(jac.shape[0], -1, 1)]
    gramian = method._gramian(blocks, None) if method.uses_gramian else None
    first, second = method.aggregate(blocks, gramian, torch.ones(jac.shape[0]), None, None)[0]
    return torch.cat([first, second.reshape(-1)])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", sorted(EQUIVALENTS))
def test_torchjds_aggregator_gives_our_direction(name, case):
    if case == "three tasks" and name in ORDER_DEPENDENT:
        pytest.skip(f"{name}'s random partner order differs between the two libraries at T = 3")
    t = CASES[case](0).shape[0]
    ours = METHODS[name](mode="param")
    build = CONVERGED.get(name, EQUIVALENTS[name]) if t > 2 else EQUIVALENTS[name]
    theirs = build(ours, t)
    scale = SCALE.get(name, lambda ours, t: 1.0)(ours, t)
    for step in range(3):  # the same instances: the stateful methods carry their state over
        jac = CASES[case](step)
        expected, actual = our_direction(ours, jac), theirs(jac)
        assert expected.norm() > 1e-3  # a real update, not two zeros
        where = f"{name}, {case}, step {step}"
        torch.testing.assert_close(actual / actual.norm(), expected / expected.norm(), rtol=0, atol=TOLERANCE,
                                   msg=lambda m, where=where: f"{where}: the directions differ. {m}")
        torch.testing.assert_close(actual.norm() / expected.norm(), torch.tensor(scale, dtype=torch.float64),
                                   rtol=TOLERANCE, atol=0, msg=lambda m, where=where: f"{where}: the scales differ. {m}")


def test_torchjds_mgda_at_its_defaults_stops_short_of_ours_beyond_two_tasks():
    """What the benchmark times for MGDA at T > 2: a feasible point of the same problem, no better than
    ours (the exact min-norm point), though not the same one."""
    jac = conflicting(3, seed=10)
    ours = our_direction(METHODS["MGDA"](mode="param"), jac)
    theirs = EQUIVALENTS["MGDA"](METHODS["MGDA"](mode="param"), 3)(jac)
    assert ours.norm() <= theirs.norm() * (1 + 1e-9)
    assert (theirs / theirs.norm() - ours / ours.norm()).norm() > 1e-3


def test_every_mapped_method_is_a_registered_param_mode_method():
    for name in EQUIVALENTS:
        assert name in METHODS and "param" in METHODS[name].supported_modes, name
    for name, reason in benchmark.TORCHJD_EXCLUDED.items():
        assert name in METHODS and name not in EQUIVALENTS and reason, name


def test_a_registered_method_with_a_torchjd_namesake_is_compared_or_excluded():
    """A method registered later joins the comparison through ``torchjd_equivalents`` (or is listed,
    with the reason, in ``TORCHJD_EXCLUDED``): this fails until it is in one of them."""
    namesakes = [name for name in METHODS if hasattr(aggregation, name) or hasattr(aggregation, f"{name}Weighting")]
    missing = [name for name in namesakes if name not in EQUIVALENTS and name not in benchmark.TORCHJD_EXCLUDED]
    assert not missing, (f"{missing} have a TorchJD namesake: map them in torchjd_equivalents() of "
                         "experiments/benchmarks/gradient_methods.py, or exclude them in TORCHJD_EXCLUDED with the reason.")


@pytest.mark.parametrize("name", ["UPGrad", "IMTLG", "MGDA"])
def test_torchjds_step_gives_the_benchmark_module_our_gradients(name, monkeypatch):
    """The benchmark's TorchJD steps (both ``jac_to_grad`` paths) and our step on the benchmark's module,
    batch and optimizer: the same ``.grad`` of every parameter when the optimizer steps (the heads'
    own gradients included). Two tasks: MGDA's Frank–Wolfe is exact there."""
    module, batch = benchmark.build(2, "cpu")
    optimizer = module.trainer.optimizers[0]
    named = dict(module.named_parameters())
    seen: list[dict[str, torch.Tensor]] = []
    # The optimizer records the gradients instead of stepping: every step starts from the same parameters.
    monkeypatch.setattr(optimizer, "step", lambda *args, **kwargs: seen.append(
        {n: p.grad.clone() for n, p in named.items() if p.grad is not None}))

    benchmark.make_step(module, batch, METHODS[name](mode="param"))()
    steps = benchmark.make_torchjd_steps(module, batch, name, EQUIVALENTS[name])
    assert set(steps) == {"param/torchjd", "param/torchjd-gramian"}
    for step in steps.values():
        step()
    expected, *actuals = seen
    assert set(expected) == set(named) and all(g.abs().max() > 0 for g in expected.values())
    for mode, actual in zip(steps, actuals):
        assert set(actual) == set(expected), mode
        for key, grad in expected.items():
            where = f"{name} {mode}: the gradient of {key}"
            torch.testing.assert_close(actual[key], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()),
                                       msg=lambda m, where=where: f"{where} differs. {m}")
