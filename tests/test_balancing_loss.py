"""Loss-weighting methods against hand computations on fixed losses, and their clear errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from mtl_lightning.models.backend import LightningBackend
from torch import nn

from mtl_lightning import ClassificationTask, MultiTaskModule, RegressionTask
from mtl_lightning.balancing import DWA, FAMO, GLS, IMTLL, RLW, SI, STCH, UW, BalancingContext, EqualWeighting, GradNorm
from mtl_lightning.models import MLP

TASKS = ["a", "b"]


def make_module(encoder: nn.Module | None = None, tasks=None, **kwargs) -> MultiTaskModule:
    tasks = tasks or [ClassificationTask(n, 3) for n in TASKS]
    return MultiTaskModule(encoder or MLP(4, (8,)), tasks, **kwargs)


def attach(method, module: MultiTaskModule) -> MultiTaskModule:
    """Wire ``method`` to ``module`` as Lightning's setup hook does, without fitting."""
    trainer = pl.Trainer(callbacks=[method], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1)
    module.trainer = trainer
    method.setup(trainer, module, "fit")
    module.setup("fit")
    return module


def context(module: MultiTaskModule, losses: dict[str, torch.Tensor], epoch: int = 0, batch=None) -> BalancingContext:
    return BalancingContext(losses=losses, task_names=module.task_names, features=None, batch=batch or {},
                            global_step=0, epoch=epoch, is_last_microbatch=True, model=module,
                            backend=LightningBackend(module))


def leaf(*values: float) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, requires_grad=True) for n, v in zip(TASKS, values)}


def as_floats(weights: dict[str, torch.Tensor]) -> list[float]:
    return [float(weights[n]) for n in TASKS]


# ----------------------------------------------------------------------------- closed forms
def test_uw_objective_weights_and_gradient_of_log_variance():
    method = UW()
    module = attach(method, make_module())
    with torch.no_grad():
        method.log_variance.copy_(torch.tensor([0.3, -0.2]))
    losses = leaf(2.0, 0.5)
    total, weights = method.combine(losses, context(module, losses))
    s, L = [0.3, -0.2], [2.0, 0.5]
    assert float(total) == pytest.approx(sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, L)))
    assert as_floats(weights) == pytest.approx([0.5 * math.exp(-si) for si in s])
    total.backward()
    assert method.log_variance.grad.tolist() == pytest.approx([-0.5 * math.exp(-si) * li + 0.5 for si, li in zip(s, L)])
    assert float(losses["a"].grad) == pytest.approx(0.5 * math.exp(-0.3))


def test_uw_default_init_and_libmtl_init():
    default, libmtl = UW(), UW(init_log_variance=-0.5)
    attach(default, make_module())
    attach(libmtl, make_module())
    assert default.log_variance.tolist() == [0.0, 0.0] and libmtl.log_variance.tolist() == [-0.5, -0.5]


def test_imtl_l_objective_weights_and_gradient():
    method = IMTLL()
    module = attach(method, make_module())
    with torch.no_grad():
        method.log_scale.copy_(torch.tensor([0.5, -1.0]))
    losses = leaf(2.0, 3.0)
    total, weights = method.combine(losses, context(module, losses))
    s, L = [0.5, -1.0], [2.0, 3.0]
    assert float(total) == pytest.approx(sum(math.exp(si) * li - si for si, li in zip(s, L)))
    assert as_floats(weights) == pytest.approx([math.exp(si) for si in s])
    total.backward()
    assert method.log_scale.grad.tolist() == pytest.approx([math.exp(si) * li - 1 for si, li in zip(s, L)])


def test_gls_is_geometric_mean_with_inverse_loss_weights():
    method = GLS()
    module = attach(method, make_module())
    losses = leaf(2.0, 8.0)
    total, weights = method.combine(losses, context(module, losses))
    assert float(total) == pytest.approx(4.0)
    assert as_floats(weights) == pytest.approx([4.0 / (2 * 2.0), 4.0 / (2 * 8.0)])
    total.backward()
    assert [float(losses[n].grad) for n in TASKS] == pytest.approx(as_floats(weights))


def test_si_is_sum_of_logs_with_inverse_loss_weights():
    method = SI()
    module = attach(method, make_module())
    losses = leaf(2.0, 8.0)
    total, weights = method.combine(losses, context(module, losses))
    assert float(total) == pytest.approx(math.log(2.0) + math.log(8.0))
    assert as_floats(weights) == pytest.approx([0.5, 0.125])


@pytest.mark.parametrize("method_cls", [GLS, SI, STCH, FAMO])
def test_log_based_methods_reject_non_positive_losses(method_cls):
    method = method_cls()
    module = attach(method, make_module())
    losses = leaf(1.0, -0.5)
    with pytest.raises(ValueError, match=r"'b': -0.5"):
        method.combine(losses, context(module, losses))


# ----------------------------------------------------------------------------- history-based
def test_dwa_uses_ratio_of_last_two_epoch_means():
    method = DWA(temperature=2.0)
    module = attach(method, make_module())
    for epoch, steps in [(0, [(1.0, 2.0), (3.0, 4.0)]), (1, [(1.0, 3.0)])]:
        for values in steps:
            losses = leaf(*values)
            _, weights = method.combine(losses, context(module, losses, epoch))
            assert as_floats(weights) == [1.0, 1.0]  # λ = 1 during the first two epochs
    losses = leaf(5.0, 7.0)
    total, weights = method.combine(losses, context(module, losses, epoch=2))
    r = [1.0 / 2.0, 3.0 / 3.0]  # epoch means: e0 = (2, 3), e1 = (1, 3)
    expected = [2 * math.exp(ri / 2) / sum(math.exp(rj / 2) for rj in r) for ri in r]
    assert as_floats(weights) == pytest.approx(expected)
    assert float(total) == pytest.approx(expected[0] * 5 + expected[1] * 7)


def test_dwa_task_missing_for_a_whole_epoch_is_a_clear_error():
    method = DWA()
    module = attach(method, make_module())
    for epoch in range(3):
        losses = {"a": torch.tensor(1.0 + epoch)}  # task 'b' never has a label
        if epoch < 2:
            method.combine(losses, context(module, losses, epoch))
    with pytest.raises(ValueError, match=r"DWA: task\(s\) \['b'\]"):
        method.combine(losses, context(module, losses, 2))


def test_dwa_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)


def test_rlw_weights_are_softmax_of_standard_normal_draws_and_resume():
    method = RLW(seed=3)
    module = attach(method, make_module())
    reference = torch.Generator().manual_seed(3)
    state = None
    for step in range(4):
        if step == 2:
            state = method.state_dict()
        losses = leaf(1.0, 2.0)
        _, weights = method.combine(losses, context(module, losses))
        expected = torch.softmax(torch.randn(2, generator=reference), 0)
        assert as_floats(weights) == pytest.approx(expected.tolist())
    resumed = RLW(seed=99)
    resumed.load_state_dict(state)
    reference = torch.Generator().manual_seed(3)
    draws = [torch.softmax(torch.randn(2, generator=reference), 0) for _ in range(4)]
    attach(resumed, make_module())
    losses = leaf(1.0, 2.0)
    _, weights = resumed.combine(losses, context(module, losses))
    assert as_floats(weights) == pytest.approx(draws[2].tolist())


def test_stch_log_warmup_then_nadir_normalised_smooth_max():
    method = STCH(mu=1.0, warmup_epochs=1)
    module = attach(method, make_module())
    for epoch, values in [(0, (1.0, 2.0)), (1, (2.0, 4.0)), (1, (4.0, 8.0))]:
        losses = leaf(*values)
        total, weights = method.combine(losses, context(module, losses, epoch))
        assert float(total) == pytest.approx(sum(math.log(v) for v in values))
        assert as_floats(weights) == pytest.approx([1 / v for v in values])
    losses = leaf(6.0, 3.0)
    total, weights = method.combine(losses, context(module, losses, epoch=2))
    assert method.nadir.tolist() == pytest.approx([3.0, 6.0])  # mean of the last warm-up epoch only
    x = [math.log(6.0 / 3.0), math.log(3.0 / 6.0)]
    lse = math.log(sum(math.exp(v) for v in x))
    assert float(total) == pytest.approx(2 * lse)
    softmax = [math.exp(v - lse) for v in x]
    assert as_floats(weights) == pytest.approx([2 * softmax[0] / 6.0, 2 * softmax[1] / 3.0])


def test_stch_smaller_mu_concentrates_weight_on_worst_task():
    weights = {}
    for mu in (1.0, 0.05):
        method = STCH(mu=mu, warmup_epochs=0)
        module = attach(method, make_module())
        losses = leaf(1.0, 1.0)
        method.combine(losses, context(module, losses, 0))
        losses = leaf(2.0, 1.1)
        _, w = method.combine(losses, context(module, losses, 1))
        weights[mu] = as_floats(w)
    share = {mu: w[0] * 2.0 / (w[0] * 2.0 + w[1] * 1.1) for mu, w in weights.items()}
    assert share[0.05] > 0.99 > share[1.0]


def test_stch_without_warmup_losses_is_a_clear_error():
    method = STCH(warmup_epochs=2)
    module = attach(method, make_module())
    losses = leaf(1.0, 1.0)
    with pytest.raises(RuntimeError, match="nadir"):
        method.combine(losses, context(module, losses, epoch=5))


class _RecomputedContext(BalancingContext):
    """A context whose post-step losses are given (the real one re-runs the model)."""

    after: dict[str, torch.Tensor] = {}

    def recompute_losses(self):
        return self.after


def test_famo_weights_and_logit_update_after_one_step():
    method = FAMO(gamma=0.0, lr=0.025)
    module = attach(method, make_module())
    losses = leaf(2.0, 1.0)
    ctx = _RecomputedContext(losses=losses, task_names=TASKS, features=None, batch={}, global_step=0, epoch=0,
                             is_last_microbatch=True, model=module, backend=LightningBackend(module))
    total, weights = method.combine(losses, ctx)
    c = 0.5 / 2.0 + 0.5 / 1.0
    assert float(total) == pytest.approx((0.5 * math.log(2.0) + 0.5 * math.log(1.0)) / c, rel=1e-6)
    assert as_floats(weights) == pytest.approx([0.5 / (c * 2.0), 0.5 / (c * 1.0)], rel=1e-6)
    ctx.after = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    method.on_optimizer_step(ctx)
    # δ = (log 2, 0); ξ.grad = z ⊙ (δ − zᵀδ) = (+¼ log 2, −¼ log 2); Adam's first step moves each by lr.
    assert method.logits.tolist() == pytest.approx([-0.025, 0.025], rel=1e-4)
    assert method.task_weights()[1] > 0.5  # the task that did not improve gets more weight


def test_famo_min_losses_must_name_known_tasks():
    with pytest.raises(ValueError, match=r"min_losses.*\['c'\]"):
        attach(FAMO(min_losses={"c": 0.0}), make_module())


def test_famo_state_roundtrip_keeps_adam_moments():
    method = FAMO(gamma=1e-3)
    module = attach(method, make_module())
    losses = leaf(2.0, 1.0)
    ctx = _RecomputedContext(losses=losses, task_names=TASKS, features=None, batch={}, global_step=0, epoch=0,
                             is_last_microbatch=True, model=module, backend=LightningBackend(module))
    method.combine(losses, ctx)
    ctx.after = {"a": torch.tensor(1.5), "b": torch.tensor(0.9)}
    method.on_optimizer_step(ctx)
    state = method.state_dict()
    copy = FAMO(gamma=1e-3)
    copy.load_state_dict(state)
    attach(copy, make_module())
    for m in (method, copy):
        m.combine(losses, ctx)
        m.on_optimizer_step(ctx)
    assert torch.equal(method.logits, copy.logits)


# ----------------------------------------------------------------------------- GradNorm
def test_gradnorm_target_weight_gradient_and_renormalisation():
    # Shared layer p (one weight), input 1: L_a = (p − 0)², L_b = (p − 1)²; at p = 3: L = (9, 4), ∇ = (6, 4).
    encoder = nn.Linear(1, 1, bias=False)
    encoder.out_features = 1
    with torch.no_grad():
        encoder.weight.fill_(3.0)
    tasks = [RegressionTask(n, head=nn.Identity()) for n in TASKS]
    method = GradNorm(alpha=1.5)
    module = attach(method, make_module(encoder, tasks))
    batch = {"input": torch.ones(1, 1), "a": torch.zeros(1), "b": torch.ones(1)}
    _, _, losses = module.compute_losses(batch)
    method.initial_losses = torch.tensor([18.0, 2.0])
    total, weights = method.combine(losses, context(module, losses, batch=batch))
    relative = torch.tensor([9 / 18, 4 / 2])
    relative = relative / relative.mean()
    target = 5.0 * relative**1.5  # mean G = (6 + 4) / 2
    assert float(total) == pytest.approx(13.0 + abs(6 - float(target[0])) + abs(4 - float(target[1])), rel=1e-5)
    module.zero_grad()
    total.backward()
    signs = torch.sign(torch.tensor([6.0, 4.0]) - target)
    assert method.weights.grad.tolist() == pytest.approx((signs * torch.tensor([6.0, 4.0])).tolist())
    assert float(encoder.weight.grad) == pytest.approx(6.0 + 4.0)  # Σ w L with w = 1; L_grad does not reach p
    with torch.no_grad():
        method.weights.copy_(torch.tensor([0.5, 2.5]))
    method.on_optimizer_step(context(module, losses))
    assert method.weights.tolist() == pytest.approx([1 / 3, 5 / 3])


def test_gradnorm_first_step_records_initial_losses_and_unknown_layer_errors():
    method = GradNorm(shared_layer="nope")
    module = attach(method, make_module())
    batch = {"input": torch.randn(8, 4), "a": torch.randint(3, (8,)), "b": torch.randint(3, (8,))}
    _, _, losses = module.compute_losses(batch)
    with pytest.raises(ValueError, match=r"shared_layer 'nope'.*net.0"):
        method.combine(losses, context(module, losses, batch=batch))
    method = GradNorm()
    module = attach(method, make_module())
    _, _, losses = module.compute_losses(batch)
    method.combine(losses, context(module, losses, batch=batch))
    assert method.initial_losses.tolist() == pytest.approx([float(losses[n]) for n in TASKS])


# ----------------------------------------------------------------------------- wiring
def test_two_balancing_callbacks_is_a_clear_error():
    module = make_module()
    trainer = pl.Trainer(callbacks=[UW(), DWA()], logger=False, enable_progress_bar=False, max_steps=1)
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"Only one balancing method.*\['UW', 'DWA'\]"):
        module.setup("fit")


@pytest.mark.parametrize("method_cls, key", [(UW, "UW__log_variance"), (IMTLL, "IMTLL__log_scale"), (GradNorm, "GradNorm__weights")])
def test_learnable_weights_train_in_their_own_group_without_weight_decay(method_cls, key):
    from functools import partial

    pl.seed_everything(0)
    method = method_cls()
    data = {"input": torch.randn(64, 4), "a": torch.randint(3, (64,)), "b": torch.randint(3, (64,))}
    from mtl_lightning.data import TensorDictDataset
    from mtl_lightning.data.datamodule import collate_batched

    loader = torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=16, collate_fn=collate_batched)
    module = make_module(optimizer=partial(torch.optim.AdamW, lr=0.01, weight_decay=0.5))
    grads, initial = [], []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            initial.append(pl_module.balancing_parameters[key].detach().clone())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.balancing_parameters[key].grad.clone())

    trainer = pl.Trainer(callbacks=[method, Probe()], max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, loader)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"] == [module.balancing_parameters[key]]
    assert len(grads) == 3 and all(g.abs().sum() > 0 for g in grads)
    assert not torch.equal(initial[0], module.balancing_parameters[key].detach())
    assert f"balancing_parameters.{key}" in module.state_dict()  # checkpointed with the model


def test_learnable_weights_survive_a_second_setup():
    """fit → validate → fit: the callback keeps using the module's (trained) parameter."""
    method = UW()
    data = {"input": torch.randn(32, 4), "a": torch.randint(3, (32,)), "b": torch.randint(3, (32,))}
    from mtl_lightning.data import TensorDictDataset
    from mtl_lightning.data.datamodule import collate_batched

    loader = torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=16, collate_fn=collate_batched)
    module = make_module()
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    pl.Trainer(callbacks=[method], max_steps=2, **kwargs).fit(module, loader)
    trained = module.balancing_parameters["UW__log_variance"]
    pl.Trainer(callbacks=[method], **kwargs).validate(module, loader, verbose=False)
    assert method.log_variance is trained and trained.abs().sum() > 0
    after_first_fit = trained.detach().clone()
    pl.Trainer(callbacks=[method], max_steps=2, **kwargs).fit(module, loader)
    assert method.log_variance is module.balancing_parameters["UW__log_variance"]
    assert not torch.equal(after_first_fit, module.balancing_parameters["UW__log_variance"].detach())


ALL_METHODS = [UW, DWA, RLW, GLS, SI, IMTLL, STCH, FAMO, GradNorm, EqualWeighting]


@pytest.mark.parametrize("method_cls", ALL_METHODS, ids=lambda c: c.__name__)
def test_every_method_trains_under_bf16_with_accumulation_and_logs_weights(method_cls):
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = {"input": x, "a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}
    from mtl_lightning.data import TensorDictDataset
    from mtl_lightning.data.datamodule import collate_batched

    loader = torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=16, collate_fn=collate_batched)
    method = method_cls(warmup_epochs=0) if method_cls is STCH else method_cls()
    module = make_module(accumulate_grad_batches=2)
    weights = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append([float(trainer.callback_metrics[f"train/{t}/weight"]) for t in TASKS])

    trainer = pl.Trainer(callbacks=[method, Probe()], max_epochs=3, precision="bf16-mixed", logger=False, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, loader)
    assert trainer.global_step == 3 * 2  # 4 micro-batches per epoch, 2 per step
    assert len(weights) == 12 and all(math.isfinite(w) and w >= 0 for row in weights for w in row)
