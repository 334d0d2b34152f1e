"""Auto-λ (Liu et al., TMLR 2022): the λ update against the exact bilevel gradient and against the
official code's update (reimplemented here from github.com/lorenmt/auto-lambda ``auto_lambda.py``),
the held-out stream, DDP, resuming, learning on MultiDigits and the option errors."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from gradient_helpers import fit_two_digit_tasks
from helpers import assert_same_state, quiet_trainer, resumable_state
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from mtl_lightning import ClassificationTask, MultiTaskModule, RegressionTask
from mtl_lightning.balancing import AutoLambda, BalancingContext, EqualWeighting
from mtl_lightning.data import MultiDatasetDataModule, MultiDigitsDataModule, MultiTaskDataModule, TensorDictDataset
from mtl_lightning.data.held_out import HeldOutBatches
from mtl_lightning.models import MLP
from mtl_lightning.models.backend import LightningBackend

pytestmark = pytest.mark.one_thread

TASKS = ("y1", "y2", "y3")


class PlainMSE(RegressionTask):
    """MSE in the output's own dtype (RegressionTask computes in float32), for float64 references."""

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return (output[:, 0] - target).square().mean()


def regression_splits(sizes: dict[str, int], dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """y1, y2: two related linear targets; y3: noise (an auxiliary task that cannot help)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    out = {}
    for split, n in sizes.items():
        x = torch.randn(n, 3, generator=g)
        out[split] = {"input": x, "y1": x @ a + 0.1 * torch.randn(n, generator=g),
                      "y2": x @ (a + 0.5 * b) + 0.1 * torch.randn(n, generator=g), "y3": torch.randn(n, generator=g)}
        out[split] = {k: v.to(dtype) for k, v in out[split].items()}
    return out


class Splits(MultiTaskDataModule):
    def __init__(self, splits: dict[str, dict[str, Tensor]], batch_size: int, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.splits = splits

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        return {name: TensorDictDataset(tensors) for name, tensors in self.splits.items()}


def linear_module(task: type = PlainMSE, dtype: torch.dtype = torch.float32, seed: int = 0, **optimizer: Any) -> MultiTaskModule:
    torch.manual_seed(seed)
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **optimizer}
    module = MultiTaskModule(nn.Linear(3, 4), [task(name) for name in TASKS], optimizer=partial(torch.optim.SGD, **options))
    return module.to(dtype)


class Recorder(pl.Callback):
    """θ, the SGD momentum buffers and λ before every step; λ's gradient after it."""

    def __init__(self, method: AutoLambda) -> None:
        self.method = method
        self.before: list[dict[str, Any]] = []
        self.hypergradients: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        params = dict(pl_module.named_parameters())
        buffers = {n: optimizer.state.get(p, {}).get("momentum_buffer") for n, p in params.items()}
        self.before.append({
            "params": {n: p.detach().clone() for n, p in params.items()},
            "buffers": {n: None if b is None else b.clone() for n, b in buffers.items()},
            "weights": self.method.task_weights().clone(),
            "batch": {k: v.clone() for k, v in batch.items()},
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert self.method.weights is not None and self.method.weights.grad is not None
        self.hypergradients.append(self.method.weights.grad.clone())


def fit(module: MultiTaskModule, data: pl.LightningDataModule, callbacks: list, max_steps: int, **kwargs: Any) -> pl.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, max_steps=max_steps, max_epochs=-1, num_sanity_val_steps=0,
                            limit_val_batches=0, **kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


# ------------------------------------------------------------------------ the exact bilevel gradient
def exact_hypergradient(module: MultiTaskModule, before: dict[str, Any], held_out: dict[str, Tensor], primary: list[int],
                        lr: float, momentum: float, weight_decay: float) -> Tensor:
    """∂/∂λ Σ_{t∈primary} L_t^val(θ'(λ)) by autograd through θ'(λ) = θ − lr(μ·m + ∇_θ Σ_t λ_t L_t(θ) + wd·θ)."""
    weights = before["weights"].double().requires_grad_(True)
    theta = {n: p.clone().requires_grad_(True) for n, p in before["params"].items()}

    def task_losses(params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        outputs = torch.func.functional_call(module, params, (batch["input"],))
        return torch.stack([(outputs[t][:, 0] - batch[t]).square().mean() for t in TASKS])

    grads = torch.autograd.grad((weights * task_losses(theta, before["batch"])).sum(), list(theta.values()), create_graph=True)
    virtual = {}
    for (name, p), g in zip(theta.items(), grads):
        buffer = before["buffers"][name]
        step = g + weight_decay * p + (momentum * buffer if buffer is not None else 0.0)
        virtual[name] = p - lr * step
    (hyper,) = torch.autograd.grad(task_losses(virtual, held_out)[primary].sum(), weights)
    return hyper


@pytest.mark.parametrize("primary", [None, ["y1"]], ids=["all tasks", "auxiliary learning"])
def test_hypergradient_equals_the_exact_bilevel_gradient(primary):
    """Float64: the finite difference along d equals autograd through the virtual step (its error is
    O(0.01²)); steps 2 and 3 include the SGD momentum buffer; weight decay throughout."""
    splits = regression_splits({"train": 16, "val": 8, "test": 8}, torch.float64)
    module = linear_module(dtype=torch.float64)
    reference_module = copy.deepcopy(module)
    method = AutoLambda(primary=primary, lr=0.01)
    recorder = Recorder(method)
    fit(module, Splits(splits, batch_size=16), [method, recorder], max_steps=3)
    held_out = splits["val"]  # the held-out batch is the whole split (8 ≤ 16), in some order: the mean is the same
    indices = [0] if primary == ["y1"] else [0, 1, 2]
    for step, (before, hyper) in enumerate(zip(recorder.before, recorder.hypergradients)):
        expected = exact_hypergradient(reference_module, before, held_out, indices, lr=0.05, momentum=0.9, weight_decay=1e-3)
        assert float(expected.abs().max()) > 1e-3
        torch.testing.assert_close(hyper.double(), expected, rtol=1e-4, atol=1e-7, msg=f"step {step}")
    assert all(b is not None for b in recorder.before[1]["buffers"].values())  # momentum from step 2


# ------------------------------------------------------------------------ the official update
class OfficialAutoLambda:
    """``auto_lambda.py`` of github.com/lorenmt/auto-lambda, line for line, with ``model_fit`` on this
    module's outputs. One change: a parameter the primary loss does not reach (an auxiliary head)
    gets a zero d instead of None, on which the official code fails (``eps * None``)."""

    def __init__(self, model, device, train_tasks, pri_tasks, weight_init=0.1):
        self.model = model
        self.model_ = copy.deepcopy(model)
        self.meta_weights = torch.tensor([weight_init] * len(train_tasks), requires_grad=True, device=device)
        self.train_tasks = train_tasks
        self.pri_tasks = pri_tasks

    def virtual_step(self, train_x, train_y, alpha, model_optim):
        train_pred = self.model(train_x)
        train_loss = self.model_fit(train_pred, train_y)
        loss = sum([w * train_loss[i] for i, w in enumerate(self.meta_weights)])
        gradients = torch.autograd.grad(loss, self.model.parameters())
        with torch.no_grad():
            for weight, weight_, grad in zip(self.model.parameters(), self.model_.parameters(), gradients):
                if 'momentum' in model_optim.param_groups[0].keys():
                    m = model_optim.state[weight].get('momentum_buffer', 0.) * model_optim.param_groups[0]['momentum']
                else:
                    m = 0
                weight_.copy_(weight - alpha * (m + grad + model_optim.param_groups[0]['weight_decay'] * weight))

    def unrolled_backward(self, train_x, train_y, val_x, val_y, alpha, model_optim):
        self.virtual_step(train_x, train_y, alpha, model_optim)
        pri_weights = [1.0 if t in self.pri_tasks else 0.0 for t in self.train_tasks]
        val_pred = self.model_(val_x)
        val_loss = self.model_fit(val_pred, val_y)
        loss = sum([w * val_loss[i] for i, w in enumerate(pri_weights)])
        model_weights_ = tuple(self.model_.parameters())
        d_model = torch.autograd.grad(loss, model_weights_, allow_unused=True)
        d_model = [torch.zeros_like(w) if d is None else d for d, w in zip(d_model, model_weights_)]  # the one change
        hessian = self.compute_hessian(d_model, train_x, train_y)
        with torch.no_grad():
            for mw, h in zip([self.meta_weights], hessian):
                mw.grad = - alpha * h

    def compute_hessian(self, d_model, train_x, train_y):
        norm = torch.cat([w.view(-1) for w in d_model]).norm()
        eps = 0.01 / norm
        with torch.no_grad():
            for p, d in zip(self.model.parameters(), d_model):
                p += eps * d
        train_pred = self.model(train_x)
        train_loss = self.model_fit(train_pred, train_y)
        loss = sum([w * train_loss[i] for i, w in enumerate(self.meta_weights)])
        d_weight_p = torch.autograd.grad(loss, self.meta_weights)
        with torch.no_grad():
            for p, d in zip(self.model.parameters(), d_model):
                p -= 2 * eps * d
        train_pred = self.model(train_x)
        train_loss = self.model_fit(train_pred, train_y)
        loss = sum([w * train_loss[i] for i, w in enumerate(self.meta_weights)])
        d_weight_n = torch.autograd.grad(loss, self.meta_weights)
        with torch.no_grad():
            for p, d in zip(self.model.parameters(), d_model):
                p += eps * d
        hessian = [(p - n) / (2. * eps) for p, n in zip(d_weight_p, d_weight_n)]
        return hessian

    def model_fit(self, pred, targets):
        return [(pred[task_id][:, 0] - targets[task_id]).square().mean() for task_id in self.train_tasks]


def official_run(module: MultiTaskModule, splits: dict[str, dict[str, Tensor]], primary: list[str], steps: int,
                 meta_lr: float) -> tuple[Tensor, list[Tensor], MultiTaskModule]:
    """The official training loop (``trainer_dense.py``): meta step, then the step on Σ λ_t L_t.
    Returns the final λ, λ's gradient at every step and the model."""
    model = copy.deepcopy(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    autol = OfficialAutoLambda(model, "cpu", list(TASKS), primary)
    meta_optimizer = torch.optim.Adam([autol.meta_weights], lr=meta_lr)
    train, val = splits["train"], splits["val"]
    hypergradients = []
    for _ in range(steps):
        meta_optimizer.zero_grad()
        autol.unrolled_backward(train["input"], train, val["input"], val, optimizer.param_groups[0]["lr"], optimizer)
        hypergradients.append(autol.meta_weights.grad.clone())
        meta_optimizer.step()
        optimizer.zero_grad()
        train_loss = autol.model_fit(model(train["input"]), train)
        loss = sum([w * train_loss[i] for i, w in enumerate(autol.meta_weights)])
        loss.backward()
        optimizer.step()
    return autol.meta_weights.detach(), hypergradients, model


@pytest.mark.parametrize("primary", [list(TASKS), ["y1"]], ids=["all tasks", "auxiliary learning"])
def test_training_matches_the_official_code(primary):
    """Six steps of SGD with momentum and weight decay: λ's gradient at every step, λ and the model
    equal the official loop's (the training and held-out batches are whole splits, whose mean losses
    do not depend on the order of the samples). Float32, as the official code runs: the finite
    difference of two float32 losses carries ~2e-5 of rounding (both codes), hence the tolerances."""
    splits = regression_splits({"train": 16, "val": 8, "test": 8})
    module = linear_module()
    expected_weights, expected_hypergradients, expected_model = official_run(module, splits, primary, steps=6, meta_lr=0.01)
    method = AutoLambda(primary=primary, lr=0.01)
    recorder = Recorder(method)
    fit(module, Splits(splits, batch_size=16), [method, recorder], max_steps=6)
    for step, (hyper, expected) in enumerate(zip(recorder.hypergradients, expected_hypergradients, strict=True)):
        torch.testing.assert_close(hyper, expected, rtol=0, atol=1e-4, msg=f"step {step}")
    assert float((expected_weights - 0.1).abs().max()) > 0.02  # λ moved (six Adam steps of ≤ 0.01)
    torch.testing.assert_close(method.task_weights(), expected_weights, rtol=0, atol=1e-5)
    for (name, p), q in zip(module.named_parameters(), expected_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_several_parameter_groups_use_each_groups_learning_rate():
    """With per-role learning rates the virtual step moves each parameter by its own group's α (the
    official code reads group 0's); the result is the exact gradient of that virtual step."""
    splits = regression_splits({"train": 16, "val": 8, "test": 8}, torch.float64)
    module = linear_module(dtype=torch.float64, momentum=0.0, weight_decay=0.0)
    module.parameter_groups = {"shared": {"lr": 0.2}}  # the heads keep 0.05
    reference = copy.deepcopy(module)
    method = AutoLambda(lr=0.01)
    recorder = Recorder(method)
    fit(module, Splits(splits, batch_size=16), [method, recorder], max_steps=1)
    before = recorder.before[0]
    weights = before["weights"].double().requires_grad_(True)
    theta = {n: p.clone().requires_grad_(True) for n, p in before["params"].items()}

    def task_losses(params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        outputs = torch.func.functional_call(reference, params, (batch["input"],))
        return torch.stack([(outputs[t][:, 0] - batch[t]).square().mean() for t in TASKS])

    grads = torch.autograd.grad((weights * task_losses(theta, before["batch"])).sum(), list(theta.values()), create_graph=True)
    virtual = {n: p - (0.2 if n.startswith("encoder.") else 0.05) * g for (n, p), g in zip(theta.items(), grads)}
    (expected,) = torch.autograd.grad(task_losses(virtual, splits["val"]).sum(), weights)
    torch.testing.assert_close(recorder.hypergradients[0].double(), expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ the look-ahead leaves the model alone
class RecordingDropout(nn.Module):
    """Dropout that keeps the masks it draws."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        mask = (torch.rand_like(x) > 0.3).to(x.dtype)
        self.masks.append(mask)
        return x * mask / 0.7


def test_the_look_ahead_changes_no_parameter_or_buffer_and_differences_on_one_dropout_mask():
    torch.manual_seed(0)
    dropout = RecordingDropout()
    encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), dropout)
    encoder.out_features = 4  # type: ignore[assignment]
    module = MultiTaskModule(encoder, [RegressionTask(n) for n in TASKS], optimizer=partial(torch.optim.SGD, lr=0.1))
    data = Splits(regression_splits({"train": 16, "val": 8, "test": 8}), batch_size=16)
    method = AutoLambda()
    trainer = pl.Trainer(callbacks=[method], logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1)
    module.trainer = trainer
    trainer.datamodule = data  # type: ignore[misc]
    data.trainer = trainer
    data.setup("fit")
    method.setup(trainer, module, "fit")
    module.setup("fit")
    trainer.strategy.optimizers = [torch.optim.SGD(module.parameters(), lr=0.1)]
    module.train()
    batch = {k: v for k, v in data.datasets["train"][list(range(16))].items()}
    forward = module.training_losses(batch)
    ctx = BalancingContext(losses=forward.losses, task_names=module.task_names, features=forward.features, batch=batch,
                           global_step=0, epoch=0, is_last_microbatch=True, model=module, backend=LightningBackend(module))
    state = copy.deepcopy(module.state_dict())
    method.update_weights(ctx)
    assert_same_state(module.state_dict(), state, "module state after the look-ahead")  # batch-norm statistics too
    # masks: the training forward, the held-out forward at θ', the forwards at θ + εv and θ − εv
    assert [tuple(m.shape) for m in dropout.masks] == [(16, 4), (8, 4), (16, 4), (16, 4)]
    assert torch.equal(dropout.masks[2], dropout.masks[3]) and not torch.equal(dropout.masks[0], dropout.masks[2])
    assert not torch.equal(method.task_weights(), torch.full((3,), 0.1))
    assert method.weights is not None and method.weights.grad is not None and torch.isfinite(method.weights.grad).all()


# ------------------------------------------------------------------------ the held-out stream
def test_held_out_batches_are_rank_shards_of_one_permutation_and_cover_each_pass():
    data = TensorDictDataset({"input": torch.arange(20.0), "y": torch.arange(20)})
    single = HeldOutBatches({None: data}, batch_size=6, seed=3)
    ranks = [HeldOutBatches({None: data}, batch_size=3, seed=3, world_size=2, rank=r) for r in (0, 1)]
    assert single.draws_per_pass == ranks[0].draws_per_pass == 3  # 20 // 6: two samples sit out each pass
    for draw in range(7):
        parts = [r.batch(draw)["y"] for r in ranks]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert torch.cat(parts).tolist() == single.batch(draw)["y"].tolist()
    first_pass = torch.cat([single.batch(k)["y"] for k in range(3)])
    assert len(set(first_pass.tolist())) == 18
    assert single.batch(3)["y"].tolist() != single.batch(0)["y"].tolist()  # a new permutation per pass
    again = HeldOutBatches({None: data}, batch_size=6, seed=3)  # a resumed run rebuilds the stream
    assert again.batch(5)["y"].tolist() == single.batch(5)["y"].tolist()
    assert HeldOutBatches({None: data}, batch_size=6, seed=4).batch(0)["y"].tolist() != single.batch(0)["y"].tolist()


def test_held_out_batches_of_an_augmented_dataset_are_keyed_by_pass():
    class Augmented(torch.utils.data.Dataset):
        epoch_keyed = True

        def __len__(self) -> int:
            return 8

        def __getitem__(self, key):
            epoch, index = key
            return {"input": torch.tensor([float(index)]), "epoch": torch.tensor(epoch)}

    stream = HeldOutBatches({None: Augmented()}, batch_size=4, seed=0)
    assert stream.batch(0)["epoch"].tolist() == [0] * 4 and stream.batch(2)["epoch"].tolist() == [1] * 4


def test_the_training_order_is_the_same_with_and_without_held_out_batches():
    class SeenInputs(pl.Callback):
        def __init__(self) -> None:
            self.inputs: list[Tensor] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.inputs.append(batch["input"].clone())

    splits = regression_splits({"train": 48, "val": 16, "test": 8})
    orders = []
    for method in (EqualWeighting(), AutoLambda(split="train"), AutoLambda(split="val")):
        seen = SeenInputs()
        fit(linear_module(RegressionTask), Splits(splits, batch_size=8, seed=5), [method, seen], max_steps=12)
        orders.append(seen.inputs)
    for order in orders[1:]:
        assert_same_state(order, orders[0], "training batches")


def test_update_every_and_gradient_accumulation():
    splits = regression_splits({"train": 64, "val": 32, "test": 8})
    every_two = AutoLambda(update_every=2)
    fit(linear_module(RegressionTask), Splits(splits, batch_size=8), [every_two], max_steps=5)
    assert every_two.held_out_draws == 3 and every_two.last_update_step == 4  # steps 0, 2, 4
    accumulated = AutoLambda()
    module = MultiTaskModule(nn.Linear(3, 4), [RegressionTask(n) for n in TASKS], accumulate_grad_batches=2)
    fit(module, Splits(splits, batch_size=8), [accumulated], max_steps=3)
    assert accumulated.held_out_draws == 3  # once per optimizer step (6 micro-batches)


# ------------------------------------------------------------------------ DDP and resuming
class SaveRank(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save({"state": pl_module.balancer.state_dict(), "params": [p.detach().clone() for p in pl_module.parameters()]},
                   f"{self.folder}/rank{trainer.global_rank}_of{trainer.world_size}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_on_their_union(tmp_path):
    """Two gloo ranks with batch 8 (training and held-out) hold the same λ, equal to one process with
    batch 16: the virtual step, d and the λ gradient are averaged over ranks."""
    splits = regression_splits({"train": 64, "val": 32, "test": 8})
    runs = {1: 16, 2: 8}
    for devices, batch_size in runs.items():
        module = linear_module(RegressionTask)
        trainer = pl.Trainer(strategy="ddp_spawn" if devices > 1 else "auto", accelerator="cpu", devices=devices,
                             max_steps=6, max_epochs=-1, callbacks=[AutoLambda(lr=0.01), SaveRank(str(tmp_path))],
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=Splits(splits, batch_size=batch_size))
    single = torch.load(tmp_path / "rank0_of1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt", weights_only=False) for r in (0, 1)]
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    assert ranks[0]["state"]["held_out_draws"] == 6
    weights = ranks[0]["state"]["weights"]
    assert float((weights - 0.1).abs().max()) > 0.02
    torch.testing.assert_close(weights, single["state"]["weights"], rtol=0, atol=1e-5)
    for p, q in zip(ranks[0]["params"], single["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_resume_mid_epoch_continues_the_held_out_stream(tmp_path):
    """A held-out split larger than one batch, so that every draw differs: the resumed run draws
    what the uninterrupted one did (the registry suite covers the other states)."""
    splits = regression_splits({"train": 48, "val": 40, "test": 8})

    def run(steps: int, ckpt_path: Optional[str] = None, callbacks: tuple = ()) -> dict[str, Any]:
        pl.seed_everything(0 if ckpt_path is None else 123, verbose=False)
        trainer = quiet_trainer(callbacks=[AutoLambda(lr=0.01), *callbacks], max_steps=steps, max_epochs=-1,
                                num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path),
                                enable_checkpointing=bool(callbacks))
        trainer.fit(linear_module(RegressionTask), datamodule=Splits(splits, batch_size=8, seed=1), ckpt_path=ckpt_path)
        return resumable_state(trainer)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "during", every_n_train_steps=4, save_top_k=-1)
    straight = run(8, callbacks=(checkpoint,))
    (path,) = (tmp_path / "during").glob("*-step=4.ckpt")
    assert torch.load(path, weights_only=True)["callbacks"]["AutoLambda"]["held_out_draws"] == 4
    resumed = run(8, ckpt_path=str(path))
    assert straight["balancing"]["AutoLambda"]["held_out_draws"] == 8
    assert_same_state(straight, resumed, "AutoLambda resumed")


# ------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_auto_lambda_learns_multidigits():
    method = AutoLambda()
    result = fit_two_digit_tasks(method)
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1
    assert method.held_out_draws == 16 and not torch.equal(method.task_weights(), torch.full((2,), 0.1))


@pytest.mark.slow
def test_auxiliary_learning_weighs_a_noise_task_below_the_primary_task():
    """Auxiliary learning on MultiDigits: ``left`` primary, ``random`` (labels drawn at random) an
    auxiliary task that cannot help it; λ_random ends below λ_left (the paper's noise-task result)."""
    pl.seed_everything(0)
    module = MultiTaskModule(MLP(144, (64,)), [ClassificationTask("left", 10), ClassificationTask("random", 10)],
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    data = MultiDigitsDataModule(num_train=1024, aux_tasks=("random",), batch_size=64)
    method = AutoLambda(primary=["left"], lr=1e-3)
    quiet_trainer(callbacks=[method], max_epochs=3, limit_val_batches=0).fit(module, data)
    left, random = method.task_weights().tolist()
    assert left > 0.1 + 0.01 and random < left - 0.01, (left, random)


def test_task_routed_data_draws_the_primary_tasks_held_out_sub_batches():
    def task_data(n: int, seed: int) -> TensorDictDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=g)
        return TensorDictDataset({"input": x, "label": (x[:, seed % 3] > 0).long()})

    datasets = {t: {"train": task_data(32, i), "val": task_data(16, i + 10)} for i, t in enumerate(("a", "b"))}
    data = MultiDatasetDataModule(policy="all", datasets=datasets, batch_size=8)
    tasks = [ClassificationTask("a", 2, label_key="label"), ClassificationTask("b", 2, label_key="label")]
    module = MultiTaskModule(MLP(3, (8,)), tasks, optimizer=partial(torch.optim.Adam, lr=0.01))
    method = AutoLambda(primary=["b"], lr=0.01)
    fit(module, data, [method], max_steps=4)
    assert method.held_out_draws == 4 and float((method.task_weights() - 0.1).abs().min()) > 0
    assert set(data.held_out_batches("val", ["b"]).batch(0)) == {"b"}


# ------------------------------------------------------------------------ options
@pytest.mark.parametrize("options,match", [
    ({"primary": []}, "'primary' must be a non-empty list"),
    ({"primary": "y1"}, "'primary' must be a non-empty list"),
    ({"update_every": 0}, "'update_every' must be an integer >= 1"),
    ({"lr": 0.0}, "'lr' must be > 0"),
    ({"batch_size": 0}, "'batch_size' must be an integer >= 1"),
    ({"split": ""}, "'split' must name a split"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=f"AutoLambda: {match}"):
        AutoLambda(**options)


def test_unknown_primary_task_is_named():
    data = Splits(regression_splits({"train": 16, "val": 8, "test": 8}), batch_size=8)
    with pytest.raises(ValueError, match=r"AutoLambda: 'primary' names unknown task\(s\) \['z'\]"):
        fit(linear_module(RegressionTask), data, [AutoLambda(primary=["y1", "z"])], max_steps=1)


def test_a_missing_split_is_named():
    data = Splits(regression_splits({"train": 16, "test": 8}), batch_size=8)
    with pytest.raises(ValueError, match=r"AutoLambda: split='val': Splits has no 'val' split \(it has \['test', 'train'\]\)"):
        fit(linear_module(RegressionTask), data, [AutoLambda()], max_steps=1)
    routed = MultiDatasetDataModule(datasets={"y1": {"train": TensorDictDataset({"input": torch.randn(8, 3), "y1": torch.randn(8)})}})
    module = MultiTaskModule(nn.Linear(3, 4), [RegressionTask("y1")])
    with pytest.raises(ValueError, match=r"split='val': MultiDatasetDataModule has no 'val' split for task 'y1'"):
        fit(module, routed, [AutoLambda()], max_steps=1)


def test_training_without_a_data_module_is_refused():
    batches = [{"input": torch.randn(8, 3), **{t: torch.randn(8) for t in TASKS}}]
    trainer = quiet_trainer(callbacks=[AutoLambda()], max_steps=1)
    with pytest.raises(ValueError, match=r"AutoLambda: split='val' .* the trainer has no data module"):
        trainer.fit(linear_module(RegressionTask), torch.utils.data.DataLoader(batches, batch_size=None))


def test_the_held_out_module_examples_run():
    import doctest

    import mtl_lightning.data.held_out as held_out

    result = doctest.testmod(held_out, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_multidigits_config_runs_through_the_cli():
    from pathlib import Path

    from mtl_lightning.cli import MTLCLI

    root = Path(__file__).resolve().parent.parent / "experiments" / "multidigits"
    cli = MTLCLI(args=["fit", "--config", str(root / "auto_lambda.yaml"), "--trainer.fast_dev_run=2", "--trainer.logger=false",
                       "--data.init_args.num_train=256", "--trainer.enable_progress_bar=false",
                       "--trainer.callbacks.primary=[left]"])
    (method,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AutoLambda)]
    assert method.primary_tasks == ["left"] and method.lr == 1e-4 and method.held_out_draws == 2
