"""MoCo (Fernando et al., ICLR 2023): tracked task gradients Y and weights λ.

Against LibMTL's ``MoCo.backward`` (ported from the authors' code), reimplemented in numpy from it, and
against the paper's simplex-projected variant (the authors' Trade-Off-MOL code), on a fixed sequence of
Jacobians; fp16 loss scaling and overflow; resume; options; learning on MultiDigits."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor

from gradient_helpers import fit_two_digit_tasks, make_batches, official_simplex_projection, train
from mtl_lightning.gradients import MoCo

T, P = 3, 12


def jacobians(steps: int = 6, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(T, P, generator=gen, dtype=torch.float64)
    base[1] = -0.8 * base[0] + 0.3 * base[1]  # a conflicting pair
    return [base * torch.tensor([1.0, 4.0, 0.3], dtype=torch.float64).unsqueeze(1)
            + 0.5 * torch.randn(T, P, generator=gen, dtype=torch.float64) for _ in range(steps)]


LOSSES = [torch.tensor([1.0 + 0.1 * k, 2.0 - 0.2 * k, 0.5], dtype=torch.float64) for k in range(6)]


def aggregate(method: MoCo, jac: Tensor, losses: Tensor, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(d, λ) through the method's ``aggregate``, J in two parameter blocks (× ``scale`` under fp16)."""
    s = 1.0 if scale is None else scale
    blocks = [(jac[:, :5] * s).clone(), (jac[:, 5:] * s).clone().reshape(T, 7, 1)]
    (first, second), w = method.aggregate(blocks, None, losses, scale, None)
    return torch.cat([first, second.reshape(-1)]), w


def reference(sequence: list[Tensor], losses: list[Tensor], beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5,
              rho=0.0, normalize=True, projection="softmax") -> list[tuple[np.ndarray, np.ndarray]]:
    """LibMTL's MoCo.backward in numpy: grads normalised to ‖g‖ = loss, y ← y − β_k(y − g),
    λ ← softmax(λ − γ_k (yyᵀ + ρI) λ) (or the authors' simplex projection), d = yᵀλ."""
    y = np.zeros((T, P))
    lambd = np.ones(T) / T
    out = []
    for step, (jac, loss) in enumerate(zip(sequence, losses), start=1):
        grads = jac.numpy().copy()
        if normalize:
            for tn in range(T):
                grads[tn] = grads[tn] / (np.linalg.norm(grads[tn]) + 1e-8) * loss.numpy()[tn]
        y = y - (beta / step**beta_sigma) * (y - grads)
        v = lambd - (gamma / step**gamma_sigma) * (y @ y.T + rho * np.eye(T)) @ lambd
        if projection == "softmax":
            e = np.exp(v - v.max())
            lambd = e / e.sum()
        else:
            lambd = official_simplex_projection(v)
        out.append((y.T @ lambd, lambd))
    return out


@pytest.mark.parametrize("options", [
    {},
    {"rho": 0.5, "gamma": 1.0, "beta": 0.9, "beta_sigma": 0.0},
    {"projection": "simplex", "gamma": 0.5, "normalize": False, "gamma_sigma": 0.0},
])
def test_updates_match_libmtls_over_steps(options):
    method = MoCo(**options)
    sequence = jacobians()
    for jac, loss, (expected_d, expected_w) in zip(sequence, LOSSES, reference(sequence, LOSSES, **options)):
        d, w = aggregate(method, jac, loss)
        np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(d.numpy(), expected_d, rtol=1e-10, atol=1e-12)
    assert method.steps == len(sequence)
    assert float(np.abs(expected_w - 1 / T).max()) > 1e-3  # λ did move
    if options.get("projection") == "simplex":
        assert (w == 0).any()  # the projection reaches the boundary here, where a softmax cannot


def test_the_state_is_float32_for_float32_gradients_and_close_to_float64():
    sequence = jacobians()
    single, double = MoCo(), MoCo()
    for jac, loss in zip(sequence, LOSSES):
        d32, w32 = aggregate(single, jac.float(), loss.float())
        d64, w64 = aggregate(double, jac, loss)
    assert d32.dtype == torch.float32 and single.y is not None and single.y[0].dtype == torch.float32
    torch.testing.assert_close(w32, w64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d32.double(), d64, rtol=1e-5, atol=1e-6)


def test_loss_scaling_does_not_change_the_update_and_an_overflow_leaves_the_state():
    scaled, unscaled = MoCo(normalize=False), MoCo(normalize=False)
    scale = torch.tensor(2.0**12, dtype=torch.float64)
    for jac, loss in zip(jacobians(3), LOSSES):
        d_scaled, w_scaled = aggregate(scaled, jac, loss, scale)
        d, w = aggregate(unscaled, jac, loss)
        torch.testing.assert_close(w_scaled, w, rtol=1e-12, atol=0)
        torch.testing.assert_close(d_scaled, d * scale, rtol=1e-12, atol=0)
    assert scaled.y is not None and scaled.lambd is not None
    y, lambd = [t.clone() for t in scaled.y], scaled.lambd.clone()
    overflowed = jacobians(4)[3].clone()
    overflowed[1, 2] = float("inf")
    d, _ = aggregate(scaled, overflowed, LOSSES[3], scale)  # the optimizer skips this step: the method must too
    assert not bool(torch.isfinite(d).all())
    assert all(torch.equal(a, b) for a, b in zip(y, scaled.y)) and torch.equal(lambd, scaled.lambd)
    assert scaled.steps == 3


def test_normalised_update_ignores_a_common_gradient_scale():
    jac, loss = jacobians(1)[0], LOSSES[0]
    d, w = aggregate(MoCo(), jac, loss)
    d_scaled, w_scaled = aggregate(MoCo(), 1e4 * jac, loss)
    # up to LibMTL's ‖g‖ + 1e-8 guard (~1e-9 relative at ‖g‖ ~ 5)
    torch.testing.assert_close(d_scaled, d, rtol=1e-7, atol=0)
    torch.testing.assert_close(w_scaled, w, rtol=1e-7, atol=0)


# -------------------------------------------------------------------------------- state, options
def test_a_method_rebuilt_from_its_state_continues_bit_for_bit():
    running = MoCo()
    sequence = jacobians(6, seed=2)
    for jac, loss in zip(sequence[:3], LOSSES):
        aggregate(running, jac, loss)
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    resumed = MoCo()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 3
    for jac, loss in zip(sequence[3:], LOSSES[3:]):
        (d, w), (d_resumed, w_resumed) = aggregate(running, jac, loss), aggregate(resumed, jac, loss)
        assert torch.equal(d, d_resumed) and torch.equal(w, w_resumed)
    restarted = MoCo()  # without the state: another answer
    assert not torch.equal(aggregate(restarted, sequence[-1], LOSSES[-1])[0], d)


@pytest.mark.parametrize("options,message", [
    ({"beta": 0.0}, "MoCo: beta must be in"),
    ({"beta": 1.5}, "MoCo: beta must be in"),
    ({"gamma": 0.0}, "MoCo: gamma must be > 0"),
    ({"beta_sigma": -1.0}, "MoCo: beta_sigma and gamma_sigma must be >= 0"),
    ({"rho": -0.1}, "MoCo: rho must be >= 0"),
    ({"projection": "sparsemax"}, "MoCo: projection must be one of"),
    ({"mode": "rep"}, "MoCo: mode='rep' is not supported"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        MoCo(**options)


def test_a_state_of_another_model_is_refused():
    method = MoCo()
    aggregate(method, jacobians(1)[0], LOSSES[0])
    with pytest.raises(ValueError, match="MoCo tracks gradients of shapes"):
        method.aggregate([torch.ones(T, 4, dtype=torch.float64)], None, torch.ones(T), None, None)


# ----------------------------------------------------------------------------------- learning
@pytest.mark.one_thread
def test_training_updates_the_state_once_per_optimizer_step():
    method = MoCo()
    train(method, make_batches(3, 16))
    assert method.steps == 3 and method.y is not None and method.lambd is not None
    assert torch.isfinite(method.lambd).all() and float(method.lambd.sum()) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.one_thread
def test_moco_learns_multidigits():
    method = MoCo()
    result = fit_two_digit_tasks(method)
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1
    assert method.steps == 16 and method.lambd is not None
    assert not torch.allclose(method.lambd, torch.full((2,), 0.5, dtype=torch.float64))
