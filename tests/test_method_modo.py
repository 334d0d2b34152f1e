"""MoDo (Chen et al., NeurIPS 2023): λ ← Π_Δ(λ − γ(J₁J₂ᵀλ + ρλ)) with two independent sample halves.

Against the official update (heshandevaka/Trade-Off-MOL, = LibMTL's), reimplemented in numpy from it,
and TorchJD's ``MoDoWeighting``, on fixed Jacobian pairs over several steps; the engine's sample split
against separate forward passes on the two halves; resume; options; learning on MultiDigits."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import Tensor

from gradient_helpers import fit_two_digit_tasks, make_batches, make_module, official_simplex_projection, train
from mtl_lightning.core.engine import per_task_gradients
from mtl_lightning.gradients import MoDo

T, P = 3, 10


def pairs(steps: int = 6, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Two noisy samples of the same task Jacobian per step."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(T, P, generator=gen, dtype=torch.float64)
    base[1] = -0.7 * base[0] + 0.4 * base[1]
    return [(base + 0.3 * torch.randn(T, P, generator=gen, dtype=torch.float64),
             base + 0.3 * torch.randn(T, P, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def official(sequence: list[tuple[Tensor, Tensor]], gamma: float, rho: float) -> list[np.ndarray]:
    """The official MoDo.backward's λ update: λ ← proj(λ − γ(g₁(g₂ᵀλ) + ρλ)), λ₀ = 1/T."""
    lambd = np.ones(T) / T
    out = []
    for g1, g2 in sequence:
        lambd = official_simplex_projection(lambd - gamma * (g1.numpy() @ (g2.numpy().T @ lambd) + rho * lambd))
        out.append(lambd.copy())
    return out


@pytest.mark.parametrize("gamma,rho", [(1e-3, 0.1), (0.1, 0.0), (0.3, 0.1)])
def test_weights_match_the_official_update_over_steps(gamma, rho):
    method = MoDo(gamma=gamma, rho=rho)
    sequence = pairs()
    for (g1, g2), expected in zip(sequence, official(sequence, gamma, rho)):
        w = method.weights(g1 @ g2.T, torch.ones(T))
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert float(np.abs(expected - 1 / T).max()) > 1e-4  # λ did move


def test_weights_match_torchjds_modo_weighting():
    aggregation = pytest.importorskip("torchjd.aggregation")
    method = MoDo(gamma=0.2, rho=0.1)
    reference = aggregation.MoDoWeighting(gamma=0.2, rho=0.1)
    for g1, g2 in pairs(8, seed=1):
        torch.testing.assert_close(method.weights(g1 @ g2.T, torch.ones(T)), reference(g1 @ g2.T), rtol=1e-12, atol=1e-14)


def test_aggregate_steps_on_the_given_product_and_returns_j_transposed_lambda():
    method = MoDo(gamma=0.3)
    (g1, g2), = pairs(1)
    jac = (g1 + g2) / 2
    (d,), w = method.aggregate([jac.clone()], g1 @ g2.T, torch.ones(T), None, None)
    torch.testing.assert_close(w, torch.tensor(official([(g1, g2)], 0.3, 0.1)[0]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d, w @ jac, rtol=1e-12, atol=1e-14)


def test_a_non_finite_product_leaves_lambda():
    method = MoDo(gamma=0.3)
    (g1, g2), = pairs(1)
    w = method.weights(g1 @ g2.T, torch.ones(T)).clone()
    bad = g1 @ g2.T
    bad[0, 1] = float("inf")
    assert torch.equal(method.weights(bad, torch.ones(T)), w)


# ------------------------------------------------------------------------ the engine's halves
def half(batch: dict[str, Tensor], parity: int) -> dict[str, Tensor]:
    return {k: v[parity::2] for k, v in batch.items()}


def test_the_engines_sample_halves_are_the_gradients_of_each_halfs_share_of_the_loss():
    module = make_module()
    batch = make_batches(1, 16)[0]
    shared, unshared = module.shared_parameters(), module.unshared_parameters()
    features, _, losses = module.compute_losses(batch)
    names = list(losses)
    blocks, _ = per_task_gradients([losses[n] for n in names], features, shared, unshared, sample_splits=2)
    for parity in (0, 1):
        _, _, half_losses = module.compute_losses(half(batch, parity))
        for t, name in enumerate(names):
            expected = torch.autograd.grad(half_losses[name], shared, retain_graph=True)
            for block, g in zip(blocks, expected):
                # a half holds 8 of the 16 samples: its share of the mean loss is half its own mean loss
                torch.testing.assert_close(block[parity * len(names) + t], 0.5 * g, rtol=1e-5, atol=1e-7)


def test_the_halves_sum_to_the_whole_batchs_jacobian():
    module = make_module()
    batch = make_batches(1, 15)[0]  # odd: halves of 8 and 7 samples
    shared, unshared = module.shared_parameters(), module.unshared_parameters()
    features, _, losses = module.compute_losses(batch)
    split, _ = per_task_gradients(list(losses.values()), features, shared, unshared, sample_splits=2)
    features, _, losses = module.compute_losses(batch)
    whole, _ = per_task_gradients(list(losses.values()), features, shared, unshared)
    t = len(losses)
    for s, w in zip(split, whole):
        assert s.shape == (2 * t, *w.shape[1:])
        torch.testing.assert_close(s[:t] + s[t:], w, rtol=1e-5, atol=1e-7)


def test_sample_splits_need_param_mode_and_a_shared_representation():
    with pytest.raises(ValueError, match="sample_splits=2 needs param mode"):
        per_task_gradients([torch.zeros((), requires_grad=True)], {"a": torch.zeros(2)}, [], [], sample_splits=2)


@pytest.mark.one_thread
def test_a_training_step_takes_lambdas_step_on_the_two_halves_product():
    """λ after one step of the Lightning loop = the official update with J₁, J₂ from separate forward
    passes on the even and odd samples (what the paper's two independent batches are here)."""
    batch = make_batches(1, 16)[0]
    reference = make_module()
    shared = reference.shared_parameters()
    halves = []
    for parity in (0, 1):
        _, _, losses = reference.compute_losses(half(batch, parity))
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)])
                for n in losses]
        halves.append(torch.stack(rows).double())
    gamma, rho = 0.5, 0.1
    t = halves[0].shape[0]
    lambd = np.ones(t) / t
    expected = official_simplex_projection(lambd - gamma * (halves[0].numpy() @ (halves[1].numpy().T @ lambd) + rho * lambd))
    method = MoDo(gamma=gamma, rho=rho)
    train(method, [batch])
    assert method.lambd is not None
    np.testing.assert_allclose(method.lambd.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_features_by_task_fall_back_to_one_sample_with_a_warning():
    method = MoDo()
    ctx = type("Ctx", (), {"features": {"a": torch.zeros(2)}})()
    with pytest.warns(UserWarning, match="no shared representation"):
        assert not method._splits_samples(ctx)  # type: ignore[arg-type]
    assert MoDo()._splits_samples(type("Ctx", (), {"features": torch.zeros(4, 2)})())  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- state, options
def test_a_method_rebuilt_from_its_state_continues_bit_for_bit():
    running = MoDo(gamma=0.2)
    sequence = pairs(6, seed=2)
    for g1, g2 in sequence[:3]:
        running.weights(g1 @ g2.T, torch.ones(T))
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    resumed = MoDo(gamma=0.2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g1, g2 in sequence[3:]:
        w, w_resumed = running.weights(g1 @ g2.T, torch.ones(T)), resumed.weights(g1 @ g2.T, torch.ones(T))
        assert torch.equal(w, w_resumed)
    g1, g2 = sequence[-1]
    assert not torch.equal(MoDo(gamma=0.2).weights(g1 @ g2.T, torch.ones(T)), w)  # without the state


@pytest.mark.parametrize("options,message", [
    ({"gamma": 0.0}, "MoDo: gamma must be > 0"),
    ({"rho": -1.0}, "MoDo: rho must be >= 0"),
    ({"mode": "rep"}, "MoDo: mode='rep' is not supported"),
])
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        MoDo(**options)


# ----------------------------------------------------------------------------------- learning
@pytest.mark.slow
@pytest.mark.one_thread
def test_modo_learns_multidigits():
    method = MoDo(gamma=0.1)
    result = fit_two_digit_tasks(method)
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1
    assert method.lambd is not None and not torch.allclose(method.lambd, torch.full((2,), 0.5, dtype=torch.float64))
