"""ExcessMTL (He et al., ICML 2024, arXiv 2402.02009): weights from per-task excess-risk estimates.

Against the official code's formula (yifei-he/ExcessMTL, identical in LibMTL), reimplemented in numpy
from it, and against TorchJD's ``ExcessMTLWeighting``, on a fixed sequence of Jacobians; fp16 loss
scaling and overflow; DDP with accumulation; resume; options; learning on MultiDigits."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor

from gradient_helpers import fit_two_digit_tasks, flat_parameters, make_batches, make_module, train
from helpers import run_ddp_worker
from mtl_lightning.gradients import ExcessMTL

T, P = 3, 12


def jacobians(steps: int = 8, seed: int = 0) -> list[Tensor]:
    """Task gradients that shrink at different rates (task 0 converges fastest, task 2 not at all), with
    per-step noise: the excess-risk ratios differ between tasks."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(T, P, generator=gen, dtype=torch.float64)
    decay = torch.tensor([0.6, 0.85, 1.0], dtype=torch.float64).unsqueeze(1)
    return [base * decay**k + 0.3 * torch.randn(T, P, generator=gen, dtype=torch.float64) for k in range(steps)]


def aggregate(method: ExcessMTL, jac: Tensor, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(d, w) through the method's ``aggregate``, J in two parameter blocks (× ``scale`` under fp16)."""
    s = 1.0 if scale is None else scale
    blocks = [(jac[:, :5] * s).clone(), (jac[:, 5:] * s).clone().reshape(T, 7, 1)]
    (first, second), w = method.aggregate(blocks, None, torch.ones(T, dtype=torch.float64), scale, None)
    return torch.cat([first, second.reshape(-1)]), w


def official_weights(sequence: list[Tensor], robust_step_size: float) -> list[np.ndarray]:
    """The weights each step of ``ExcessMTL.backward`` of yifei-he/ExcessMTL (= LibMTL's) applies to the
    losses, in numpy: loss_weight starts at 1; the first call only records initial_w; then
    loss_weight ← loss_weight·exp(η w/initial_w), renormalised to sum T."""
    loss_weight = np.ones(T)
    grad_sum: Optional[np.ndarray] = None
    initial_w: Optional[np.ndarray] = None
    out = []
    for jac in sequence:
        grads = jac.numpy()
        if grad_sum is None:
            grad_sum = np.zeros_like(grads)
        w = np.zeros(T)
        for i in range(T):
            grad_sum[i] += grads[i] ** 2
            h_i = np.sqrt(grad_sum[i] + 1e-7)
            w[i] = grads[i] * (1 / h_i) @ grads[i]
        if initial_w is None:
            initial_w = w
        else:
            w = w / initial_w
            loss_weight = loss_weight * np.exp(w * robust_step_size)
            loss_weight = loss_weight / loss_weight.sum() * T
        out.append(loss_weight.copy())
    return out


@pytest.mark.parametrize("robust_step_size", [1e-2, 1.0, 5.0])
def test_weights_match_the_official_formula_over_steps(robust_step_size):
    method = ExcessMTL(robust_step_size=robust_step_size)
    sequence = jacobians()
    for jac, expected in zip(sequence, official_weights(sequence, robust_step_size)):
        d, w = aggregate(method, jac)
        # The only difference, Ê/(Ê⁰ + 1e-7) for the official Ê/Ê⁰, is ~1e-7 relative here (Ê⁰ ~ 1–10).
        np.testing.assert_allclose(w.numpy(), expected, rtol=2e-6)
        torch.testing.assert_close(d, w @ jac, rtol=1e-12, atol=1e-12)
    assert not np.allclose(expected, 1.0, atol=1e-3 * robust_step_size)  # the weights did move


@pytest.mark.parametrize("warmup_steps", [1, 3])
def test_weights_are_t_times_torchjds_with_the_same_warmup(warmup_steps):
    """TorchJD keeps λ on the simplex (Σλ = 1) where the official code (and this class) keeps Σλ = T;
    with ``n_warmup_steps`` ≥ 1 the updates are otherwise the same formula."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    method = ExcessMTL(robust_step_size=2.0, warmup_steps=warmup_steps)
    reference = aggregation.ExcessMTLWeighting(robust_step_size=2.0, n_warmup_steps=warmup_steps)
    for jac in jacobians(10, seed=1):
        d, w = aggregate(method, jac)
        expected = reference(jac)
        torch.testing.assert_close(w, T * expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d, T * expected @ jac, rtol=1e-10, atol=1e-12)


def test_torchjds_default_already_steps_on_the_first_call_where_the_official_code_does_not():
    """The difference documented on the class: at TorchJD's default n_warmup_steps=0 the first call
    takes a step with the raw Ê_1; the official code (warmup_steps=1 here) keeps λ = 1 then."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = jacobians(1)[0]
    _, w = aggregate(ExcessMTL(robust_step_size=1.0), jac)
    assert torch.equal(w, torch.ones(T, dtype=torch.float64))
    torchjd = aggregation.ExcessMTLWeighting(robust_step_size=1.0)(jac)
    assert not torch.allclose(T * torchjd, w, atol=1e-3)


def test_warmup_keeps_the_weights_at_one_and_averages_the_baseline():
    method = ExcessMTL(robust_step_size=1.0, warmup_steps=3)
    excess = []
    for jac in jacobians(4):
        _, w = aggregate(method, jac)
        excess.append(method.excess.clone())
        if method.steps <= 3:
            assert torch.equal(w, torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(method.baseline, sum(excess[:3]) / 3)
    expected = torch.softmax(excess[3] / (method.baseline + 1e-7), 0) * T
    torch.testing.assert_close(w, expected)


# ------------------------------------------------------------------------------ fp16 loss scaling
def test_loss_scaling_does_not_change_the_update_and_an_overflow_leaves_the_state():
    scaled, unscaled = ExcessMTL(robust_step_size=1.0), ExcessMTL(robust_step_size=1.0)
    scale = torch.tensor(2.0**12)
    for jac in jacobians(3):
        d_scaled, w_scaled = aggregate(scaled, jac, scale)
        d, w = aggregate(unscaled, jac)
        torch.testing.assert_close(w_scaled, w, rtol=1e-12, atol=0)
        torch.testing.assert_close(d_scaled, d * scale, rtol=1e-12, atol=0)
    state = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in scaled.state_dict().items() if k != "squared_sums"}
    sums = [s.clone() for s in scaled.squared_sums]
    overflowed = jacobians(4)[3].clone()
    overflowed[1, 2] = float("inf")
    aggregate(scaled, overflowed, scale)  # the optimizer skips this step: the method must too
    assert all(torch.equal(a, b) for a, b in zip(sums, scaled.squared_sums))
    for key, value in state.items():
        assert (torch.equal(value, scaled.state_dict()[key]) if isinstance(value, Tensor)
                else value == scaled.state_dict()[key]), key


def test_on_accelerators_an_overflow_is_neutralised_without_reading_the_flag(monkeypatch):
    """Where reading the finiteness flag would synchronise with the host (GPUs), the overflowed step is
    neutralised in tensor ops instead: the same state as a skipped step, but the step is counted."""
    import mtl_lightning.gradients.excess_mtl as module

    scale = torch.tensor(2.0**12)
    sequence = jacobians(4)
    overflowed = sequence[3].clone()
    overflowed[0, 7] = float("nan")
    results = []
    for free in (True, False):
        monkeypatch.setattr(module, "reading_is_free", lambda flag, free=free: free)
        method = ExcessMTL(robust_step_size=1.0, warmup_steps=2)
        weights = [aggregate(method, jac, scale)[1] for jac in sequence[:3]]
        before = {"weights": method.task_weights.clone(), "squared_sums": [s.clone() for s in method.squared_sums]}
        aggregate(method, overflowed, scale)
        assert torch.equal(method.task_weights, before["weights"])
        assert all(torch.equal(a, b) for a, b in zip(method.squared_sums, before["squared_sums"]))
        assert method.steps == 3 + (not free)
        results.append((weights, aggregate(method, sequence[0], scale)[1]))
    (weights_free, next_free), (weights_sync_free, next_sync_free) = results
    assert all(torch.equal(a, b) for a, b in zip(weights_free, weights_sync_free))
    assert torch.equal(next_free, next_sync_free)


@pytest.mark.one_thread
def test_fp16_loss_scale_does_not_change_training():
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fp16(scale: float) -> MixedPrecision:
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale,
                                                                              growth_interval=10**6))

    batches = make_batches(4, 16)
    unit = train(ExcessMTL(robust_step_size=1.0), batches, plugins=[fp16(1.0)])
    scaled = train(ExcessMTL(robust_step_size=1.0), batches, plugins=[fp16(2.0**12)])
    torch.testing.assert_close(scaled, unit, rtol=0, atol=2e-4)


# -------------------------------------------------------------------------------- state, options
def test_a_method_rebuilt_from_its_state_continues_bit_for_bit():
    running = ExcessMTL(robust_step_size=1.0, warmup_steps=2)
    sequence = jacobians(7, seed=2)
    for jac in sequence[:3]:
        aggregate(running, jac)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    resumed = ExcessMTL(robust_step_size=1.0, warmup_steps=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for jac in sequence[3:]:
        (d, w), (d_resumed, w_resumed) = aggregate(running, jac), aggregate(resumed, jac)
        assert torch.equal(d, d_resumed) and torch.equal(w, w_resumed)
    restarted = ExcessMTL(robust_step_size=1.0, warmup_steps=2)  # without the state: another answer
    assert not torch.equal(aggregate(restarted, sequence[-1])[1], w)


class FastExcessMTL(ExcessMTL):
    """A step size at which ten steps move the weights visibly, for the Lightning resume test."""

    def __init__(self) -> None:
        super().__init__(robust_step_size=1.0, warmup_steps=2)


@pytest.mark.slow
@pytest.mark.one_thread
def test_lightning_resume_is_exact(tmp_path):
    from test_balancing_resume import assert_resumes_exactly

    assert_resumes_exactly(FastExcessMTL, tmp_path)


@pytest.mark.parametrize("options,message", [
    ({"robust_step_size": 0.0}, "ExcessMTL: robust_step_size must be > 0"),
    ({"warmup_steps": 0}, "ExcessMTL: warmup_steps must be an integer >= 1"),
    ({"warmup_steps": 1.5}, "ExcessMTL: warmup_steps must be an integer >= 1"),
    ({"mode": "rep"}, "ExcessMTL: mode='rep' is not supported"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ExcessMTL(**options)


def test_a_state_of_another_model_is_refused():
    method = ExcessMTL()
    aggregate(method, jacobians(1)[0])
    blocks = [torch.ones(T, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="ExcessMTL: the shared parameters or tasks changed"):
        method.aggregate(blocks, None, torch.ones(T), None, None)


# ------------------------------------------------------------------------------- DDP, learning
@pytest.mark.slow
def test_ddp_with_accumulation_equals_one_process_and_every_rank_holds_the_same_state(tmp_path, monkeypatch):
    monkeypatch.setenv("METHOD_GROUP", "excess_mtl")
    results = run_ddp_worker("ddp_stateful_weighting_worker.py", tmp_path)
    initial = flat_parameters(make_module(accumulate=2))
    for name, reference in results["reference"].items():
        ranks = [results[f"rank{r}"][name] for r in range(2)]
        assert (reference["parameters"] - initial).abs().max() > 1e-3, name
        assert torch.equal(ranks[0]["parameters"], ranks[1]["parameters"]), name
        for key in ("weights", "baseline", "warmup_sum"):
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), (name, key)
            torch.testing.assert_close(ranks[0]["state"][key], reference["state"][key], rtol=1e-5, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["state"]["squared_sums"], ranks[1]["state"]["squared_sums"]))
        assert ranks[0]["state"]["steps"] == reference["state"]["steps"] == 4
        torch.testing.assert_close(ranks[0]["parameters"], reference["parameters"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.one_thread
def test_excess_mtl_learns_multidigits():
    method = ExcessMTL(robust_step_size=1.0)
    result = fit_two_digit_tasks(method)
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1
    assert method.steps == 16 and not torch.allclose(method.task_weights, torch.ones(2, dtype=torch.float64))
