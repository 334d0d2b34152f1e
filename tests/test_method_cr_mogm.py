"""CR-MOGM (Zhou et al., NeurIPS 2022): the weights of any weighting, averaged across steps.

Against TorchJD's ``CRMOGMWeighting`` (there is no official code) wrapping the same weighting on a
fixed sequence of Jacobians; the micro-batch, learning-rate schedule, DDP and resume semantics; the
wrapper's errors; YAML configuration; learning on MultiDigits."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from gradient_helpers import fit_two_digit_tasks, flat_parameters, loader, make_batches, make_module, quiet_trainer
from helpers import run_ddp_worker
from mtl_lightning.balancing import EqualWeighting
from mtl_lightning.gradients import (
    CRMOGM, DBMTL, GradDrop, GradientBalancer, IMTLG, MGDA, PCGrad, TorchJDWeighting, UPGrad,
)

HERE = Path(__file__).parent
T, P = 3, 10


def jacobians(steps: int = 6, t: int = T, seed: int = 0) -> list[Tensor]:
    """A fixed sequence of conflicting Jacobians (float64), as successive mini-batches give."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        jac = torch.randn(t, P, generator=gen, dtype=torch.float64)
        jac[1] = -0.6 * jac[0] + 0.5 * jac[1]
        out.append(jac * torch.tensor([1.0, 2.0, 0.5, 1.5][:t], dtype=torch.float64).unsqueeze(1))
    return out


def step(method: GradientBalancer, jac: Tensor, ctx: Any = None) -> tuple[Tensor, Tensor]:
    """(d, w) of one step through the method's real ``aggregate``, J in two parameter blocks."""
    blocks = [jac[:, :4].clone(), jac[:, 4:].clone().reshape(jac.shape[0], 3, 2)]
    (first, second), w = method.aggregate(blocks, jac @ jac.T, torch.ones(jac.shape[0], dtype=torch.float64),
                                          None, ctx)
    return torch.cat([first, second.reshape(-1)]), w


class TorchJDGramianWeighting(GradientBalancer):
    """A TorchJD Gramian weighting as a plain weighting (only ``weights``), so that CRMOGM and TorchJD's
    CRMOGMWeighting wrap literally the same function."""

    def __init__(self, weighting: Any) -> None:
        super().__init__()
        self.weighting = weighting

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.weighting(gramian)


# ------------------------------------------------------------------------------ against TorchJD
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", ["UPGradWeighting", "MGDAWeighting", "IMTLGWeighting", "MeanWeighting"])
def test_matches_torchjds_crmogm_wrapping_the_same_weighting(name, alpha):
    aggregation = pytest.importorskip("torchjd.aggregation")
    ours = CRMOGM(TorchJDGramianWeighting(getattr(aggregation, name)()), alpha=alpha)
    reference = aggregation.GramianWeightedAggregator(aggregation.CRMOGMWeighting(getattr(aggregation, name)(),
                                                                                  alpha=alpha))
    for jac in jacobians():
        d, w = step(ours, jac)
        torch.testing.assert_close(d, reference(jac), rtol=1e-12, atol=1e-12)
    # The weights themselves, step by step, from fresh instances.
    ours = CRMOGM(TorchJDGramianWeighting(getattr(aggregation, name)()), alpha=alpha)
    weighting = aggregation.CRMOGMWeighting(getattr(aggregation, name)(), alpha=alpha)
    for jac in jacobians():
        torch.testing.assert_close(ours.weights(jac @ jac.T, torch.ones(T)), weighting(jac @ jac.T), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("ours,theirs,tolerance", [
    (IMTLG, "IMTLGWeighting", 1e-9),
    (UPGrad, "UPGradWeighting", 1e-5),  # both solve the same QPs, to their solvers' precision
])
def test_wrapping_a_built_in_weighting_matches_torchjd_wrapping_its_counterpart(ours, theirs, tolerance):
    aggregation = pytest.importorskip("torchjd.aggregation")
    method = CRMOGM(ours(), alpha=0.7)
    weighting = aggregation.CRMOGMWeighting(getattr(aggregation, theirs)(), alpha=0.7)
    for jac in jacobians(seed=3):
        _, w = step(method, jac)
        torch.testing.assert_close(w, weighting(jac @ jac.T), rtol=tolerance, atol=tolerance)


def test_the_average_is_the_recurrence_over_the_wrapped_methods_weights():
    """λ_1 = λ̂_1, λ_k = α λ_{k−1} + (1 − α) λ̂_k, with MGDA's λ̂ (the default), and d = Jᵀλ_k."""
    method, plain = CRMOGM(alpha=0.8), MGDA()
    expected = None
    for jac in jacobians():
        raw = plain.weights(jac @ jac.T, torch.ones(T))
        expected = raw if expected is None else 0.8 * expected + 0.2 * raw
        d, w = step(method, jac)
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d, expected @ jac, rtol=1e-9, atol=1e-12)
    assert isinstance(method.method, MGDA)


# ------------------------------------------------------------------------- micro-batches, schedule
def test_rep_mode_accumulation_averages_the_step_once():
    """In rep mode each micro-batch is aggregated on its own: both use λ_{k−1}, and λ_k averages the
    step's λ̂ over its micro-batches (the EMA advances once per optimizer step)."""
    method, plain = CRMOGM(MGDA(mode="rep"), alpha=0.6), MGDA()
    first, second, third = jacobians(3)
    step(method, first)  # λ_1 = λ̂(first)
    lambda_1 = method.smoothed.clone()
    raw = [plain.weights(j @ j.T, torch.ones(T)) for j in (second, third)]
    ctx = [SimpleNamespace(accumulate_grad_batches=2, is_last_microbatch=last) for last in (False, True)]
    _, w_second = step(method, second, ctx[0])
    torch.testing.assert_close(method.smoothed, lambda_1)  # not committed mid-step
    _, w_third = step(method, third, ctx[1])
    torch.testing.assert_close(w_second, 0.6 * lambda_1 + 0.4 * raw[0])
    torch.testing.assert_close(w_third, 0.6 * lambda_1 + 0.4 * raw[1])
    torch.testing.assert_close(method.smoothed, 0.6 * lambda_1 + 0.4 * (raw[0] + raw[1]) / 2)


def test_a_non_finite_step_leaves_the_average():
    method = CRMOGM(alpha=0.5)
    jac = jacobians(1)[0]
    step(method, jac)
    before = method.smoothed.clone()
    bad = jac.clone()
    bad[0, 0] = float("inf")
    method.weights(bad @ bad.T, torch.ones(T))  # an fp16 overflow step: skipped by the optimizer
    torch.testing.assert_close(method.smoothed, before, rtol=0, atol=0)


class AlphaSpy(pl.Callback):
    def __init__(self, method: CRMOGM) -> None:
        self.method, self.alphas = method, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.alphas.append(self.method.current_alpha())


def test_lr_schedule_makes_alpha_follow_the_learning_rate():
    """α_k = 1 − (1 − α)·η_k/η_0: here η halves every step, so 1 − α_k halves too."""
    method = CRMOGM(UPGrad(), alpha=0.2, schedule="lr")
    module = make_module()
    module.lr_scheduler_factory = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    module.lr_scheduler_interval = "step"
    spy = AlphaSpy(method)
    quiet_trainer(callbacks=[method, spy], max_steps=4).fit(module, loader(make_batches(4, 16)))
    assert spy.alphas == pytest.approx([1 - 0.8 * 0.5**k for k in range(4)])
    with pytest.raises(ValueError, match="schedule='lr' reads the learning rate from the Trainer"):
        CRMOGM(schedule="lr").weights(torch.eye(2, dtype=torch.float64), torch.ones(2))


# ---------------------------------------------------------------------------------- the wrapper
def test_the_wrapper_takes_its_methods_mode_promises_and_scale_law():
    assert CRMOGM().mode == "param" and isinstance(CRMOGM().method, MGDA)
    assert CRMOGM(mode="rep").method.mode == "rep" and CRMOGM(MGDA(mode="rep")).mode == "rep"
    assert CRMOGM(PCGrad(batched=False)).batched is False and CRMOGM(batched=False).method.batched is False
    assert CRMOGM(MGDA(mode="rep"), mode="rep", batched=True).mode == "rep"  # the method's own: accepted
    # MGDA's conflict-freeness does not survive averaging; PCGrad was never permutation-equivariant.
    assert CRMOGM().promises == {"permutation_equivariant", "single_task_gradient", "identical_gradients"}
    assert CRMOGM.promises == CRMOGM().promises
    assert CRMOGM(PCGrad()).promises == {"single_task_gradient", "identical_gradients"}
    assert "task_scale_invariant_direction" not in CRMOGM(IMTLG()).promises
    assert CRMOGM(MGDA()).scale_exponent == 1.0 and CRMOGM(TorchJDGramianWeighting(None)).scale_exponent == 1.0


@pytest.mark.parametrize("method,message", [
    (lambda: CRMOGM(DBMTL()), r"CRMOGM averages the weights of a weighting, and DBMTL is not one"),
    (lambda: CRMOGM(GradDrop()), r"CRMOGM averages the weights of a weighting, and GradDrop is not one"),
    (lambda: CRMOGM(TorchJDWeighting("MeanWeighting")), r"and TorchJDWeighting is not one"),
    (lambda: CRMOGM(CRMOGM()), r"and CRMOGM is not one"),
    (lambda: CRMOGM(EqualWeighting()), r"CRMOGM wraps a gradient weighting .* got EqualWeighting"),
    (lambda: CRMOGM(MGDA(), mode="rep"), r"CRMOGM runs as the method it wraps: mode='rep', but MGDA has mode='param'"),
    (lambda: CRMOGM(PCGrad(), batched=False), r"CRMOGM runs as the method it wraps: batched=False, but PCGrad"),
    (lambda: CRMOGM(alpha=1.5), r"CRMOGM: alpha must be in \[0, 1\]"),
    (lambda: CRMOGM(alpha=-0.1), r"CRMOGM: alpha must be in \[0, 1\]"),
    (lambda: CRMOGM(schedule="cosine"), r"CRMOGM: schedule='cosine'"),
])
def test_bad_options_raise_clear_errors(method, message):
    with pytest.raises(ValueError, match=message):
        method()


def test_state_dict_carries_the_average_and_the_wrapped_methods_state():
    """A fresh CRMOGM(PCGrad) loading the state (saved and loaded as weights only) of one that took two
    steps continues bit for bit: λ and PCGrad's random generator are both restored."""
    running = CRMOGM(PCGrad(seed=4), alpha=0.5)
    sequence = jacobians(6, seed=5)
    for jac in sequence[:2]:
        step(running, jac)
    state = running.state_dict()
    assert set(state) == {"smoothed", "method"} and "generator" in state["method"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = CRMOGM(PCGrad(seed=4), alpha=0.5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = CRMOGM(PCGrad(seed=4), alpha=0.5)
    fresh.load_state_dict({"smoothed": state["smoothed"]})  # λ alone: PCGrad's draws restart
    for jac in sequence[2:]:
        (d, w), (d_resumed, w_resumed) = step(running, jac), step(resumed, jac)
        assert torch.equal(d, d_resumed) and torch.equal(w, w_resumed)
    assert not all(torch.equal(step(fresh, j)[1], step(running, j)[1]) for j in sequence[2:])


class CRPCGrad(CRMOGM):
    """CR-PCGrad with a fast average, for the Lightning resume test (which builds methods from classes)."""

    def __init__(self) -> None:
        super().__init__(PCGrad(seed=2), alpha=0.5)


@pytest.mark.slow
@pytest.mark.one_thread
def test_lightning_resume_restores_the_average_and_the_wrapped_state(tmp_path):
    from test_balancing_resume import assert_resumes_exactly

    assert_resumes_exactly(CRPCGrad, tmp_path)


# ------------------------------------------------------------------------------- DDP, YAML, learning
@pytest.mark.slow
def test_ddp_with_accumulation_equals_one_process_and_every_rank_holds_the_same_state(tmp_path, monkeypatch):
    monkeypatch.setenv("METHOD_GROUP", "cr_mogm")
    results = run_ddp_worker("ddp_stateful_weighting_worker.py", tmp_path)
    initial = flat_parameters(make_module(accumulate=2))
    for name, reference in results["reference"].items():
        ranks = [results[f"rank{r}"][name] for r in range(2)]
        assert (reference["parameters"] - initial).abs().max() > 1e-3, name
        assert torch.equal(ranks[0]["parameters"], ranks[1]["parameters"]), name
        assert torch.equal(ranks[0]["state"]["smoothed"], ranks[1]["state"]["smoothed"]), name
        torch.testing.assert_close(ranks[0]["parameters"], reference["parameters"], rtol=0, atol=1e-5)
        torch.testing.assert_close(ranks[0]["state"]["smoothed"], reference["state"]["smoothed"], rtol=1e-5, atol=1e-7)


def test_the_wrapped_method_is_configured_from_yaml(tmp_path):
    from mtl_lightning.cli import MTLCLI

    root = HERE.parent / "experiments" / "multidigits"
    config = tmp_path / "cr_pcgrad.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: mtl_lightning.gradients.CRMOGM\n      init_args:\n"
                      "        alpha: 0.8\n        method:\n          class_path: mtl_lightning.gradients.PCGrad\n"
                      "          init_args: {seed: 7, mode: rep}\n")
    cli = MTLCLI(args=["fit", "--config", str(root / "ew.yaml"), "--config", str(config), "--trainer.fast_dev_run=2",
                       "--trainer.logger=false", "--data.init_args.num_train=256", "--trainer.enable_progress_bar=false"])
    (method,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CRMOGM)]
    assert isinstance(method.method, PCGrad) and method.method.generator.seed == 7
    assert method.alpha == 0.8 and method.mode == "rep" and method.smoothed is not None
    config.write_text(config.read_text().replace("PCGrad", "DBMTL").replace("seed: 7, mode: rep", "beta: 0.9"))
    with pytest.raises(ValueError, match="DBMTL is not one"):
        MTLCLI(args=["fit", "--config", str(root / "ew.yaml"), "--config", str(config), "--trainer.fast_dev_run=1",
                     "--trainer.logger=false", "--data.init_args.num_train=256"])


@pytest.mark.slow
@pytest.mark.one_thread
def test_cr_mgda_learns_multidigits():
    result = fit_two_digit_tasks(CRMOGM())
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1
