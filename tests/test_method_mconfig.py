"""M-ConFIG (``MConFIG``): against the official ``PseudoMomentumOperator`` (tum-pbs/ConFIG,
``conflictfree/momentum_operator.py`` with its default ``ConFIGOperator``), reimplemented below in
numpy from the official code, independently of the class; one task's backward through the shared
encoder per step; what the heads receive; training, AMP, state, options.

The registry-driven suites cover it too: properties (``test_method_properties.py``), exact resume
(``test_balancing_resume.py``), DDP and accumulation equivalence (``test_gradient_training.py``)."""

from __future__ import annotations

import contextlib
import io
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from architecture_zoo import ARCHITECTURES, NO_SHARED
from architecture_zoo import batch as zoo_batch
from architecture_zoo import build as zoo_build
from gradient_helpers import fit_two_digit_tasks, flat_parameters, loader, make_batches, make_module
from helpers import quiet_trainer
from mtl_lightning.core import MultiTaskStep
from mtl_lightning.gradients import ConFIG, MConFIG
from mtl_lightning.models.encoders import MLP
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.tasks import ClassificationTask

pytestmark = pytest.mark.one_thread


# ------------------------------------------------------------------- the official code, in numpy
def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return np.zeros_like(v) if norm == 0 else v / norm


def official_config(grads: np.ndarray) -> np.ndarray:
    """``ConFIGOperator().calculate_gradient(grads)``: equal weights, ``ProjectionLength``, the closed
    form ``ConFIG_update_double`` for two gradients, else least squares on the unit gradients."""
    if len(grads) == 2:
        g1, g2 = grads
        n1, n2 = np.linalg.norm(g1), np.linalg.norm(g2)
        u1, u2 = g1 / n1, g2 / n2
        cos = g1 @ g2 / n1 / n2
        or_2, or_1 = g1 - n1 * cos * u2, g2 - n2 * cos * u1
        uo1, uo2 = _unit(or_1), _unit(or_2)
        coef_1 = (uo2 @ u1) / (1.0 / 1.0 * (uo1 @ u2))  # transfer_coef_double with equal weights; coef_2 = 1
        direction = coef_1 * uo1 + uo2
    else:
        units = np.nan_to_num(grads / np.linalg.norm(grads, axis=1)[:, None], nan=0.0)
        direction = np.linalg.lstsq(units, np.ones(len(grads)), rcond=None)[0]
    unit = _unit(direction)
    return sum(g @ unit for g in grads) * unit


class OfficialPseudoMomentum:
    """``PseudoMomentumOperator(num_vectors, beta_1, beta_2)``: ``calculate_gradient(indexes, grads)``."""

    def __init__(self, num_vectors: int, beta_1: float = 0.9, beta_2: float = 0.999) -> None:
        self.n, self.beta_1, self.beta_2 = num_vectors, beta_1, beta_2
        self.m: Optional[list[np.ndarray]] = None
        self.s = self.fake_m = np.zeros(0)
        self.t = 0
        self.t_grads = [0] * num_vectors
        self.all_initialized = False

    def calculate_gradient(self, indexes: list[int], grads: list[np.ndarray]) -> np.ndarray:
        if self.m is None:
            self.m = [np.zeros_like(grads[0]) for _ in range(self.n)]
            self.s, self.fake_m = np.zeros_like(grads[0]), np.zeros_like(grads[0])
        for i, g in zip(indexes, grads):
            self.t_grads[i] += 1
            self.m[i] = self.beta_1 * self.m[i] + (1 - self.beta_1) * g
        if not self.all_initialized:
            if 0 in self.t_grads:
                return np.zeros_like(self.s)
            self.all_initialized = True
        self.t += 1
        m_hats = np.stack([self.m[i] / (1 - self.beta_1 ** self.t_grads[i]) for i in range(self.n)])
        final = official_config(m_hats)
        fake_m = final * (1 - self.beta_1**self.t)
        fake_grad = (fake_m - self.beta_1 * self.fake_m) / (1 - self.beta_1)
        self.fake_m = fake_m
        self.s = self.beta_2 * self.s + (1 - self.beta_2) * fake_grad**2
        s_hat = self.s / (1 - self.beta_2**self.t)
        return final / (np.sqrt(s_hat) + 1e-8)


class OfficialOrderedSlices:
    """``OrderedSliceSelector().select(n, range(T))``: the indexes of the official MTL trainer's step."""

    def __init__(self) -> None:
        self.start_index = 0

    def select(self, n: int, size: int) -> list[int]:
        end_index = self.start_index + n
        if end_index > size - 1:
            new_start = end_index - size
            indexes = list(range(self.start_index, size)) + list(range(0, new_start))
            self.start_index = new_start
        else:
            indexes = list(range(self.start_index, end_index))
            self.start_index = end_index
        return indexes


SHAPES = [(3, 4), (5,)]  # two shared parameters: the momenta are kept per block


def gradient_sequence(steps: int, tasks: int, seed: int = 0) -> np.ndarray:
    """(steps, T, 17): every task's gradient at every step, drifting, with a conflicting pair and
    different scales."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(tasks, 17))
    base[1] = -0.7 * base[0] + 0.4 * base[1]
    scales = np.array([1.0, 3.0, 0.2, 1.5, 0.7])[:tasks, None]
    return np.stack([(base + 0.5 * rng.normal(size=base.shape)) * scales for _ in range(steps)])


def blocks(rows: np.ndarray) -> list[torch.Tensor]:
    """(k, 17) rows as per-parameter blocks (k, 3, 4) and (k, 5), float64."""
    rows_t = torch.tensor(rows, dtype=torch.float64)
    return [rows_t[:, :12].reshape(-1, 3, 4).clone(), rows_t[:, 12:].clone()]


def flat(step: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([s.reshape(-1) for s in step]).numpy()


# --------------------------------------------------------------------- against the official code
@pytest.mark.parametrize("tasks,per_step", [(2, 1), (3, 1), (5, 1), (3, 2), (5, 3)])
def test_tasks_in_turn_match_the_official_pseudo_momentum_operator(tasks, per_step):
    """The official MTL trainer's step: ``per_step`` task gradients (``OrderedSliceSelector``), the
    momentum operator on them; here on a fixed sequence of per-task gradients."""
    sequence = gradient_sequence(4 * tasks, tasks)
    official, slices = OfficialPseudoMomentum(tasks), OfficialOrderedSlices()
    method = MConFIG(tasks_per_step=per_step)
    nonzero = 0
    for gradients in sequence:
        indexes = slices.select(per_step, tasks)
        assert method.scheduled_tasks(tasks) == indexes
        expected = official.calculate_gradient(indexes, [gradients[i] for i in indexes])
        step, weights = method.momentum_step(indexes, blocks(gradients[indexes]), tasks)
        np.testing.assert_allclose(flat(step), expected, rtol=1e-8, atol=1e-12)
        assert step[0].shape == (3, 4) and step[0].dtype == torch.float64
        nonzero += bool(np.abs(expected).max() > 0)
    assert nonzero >= len(sequence) - tasks  # zero only until every task has a momentum
    assert method.updates == official.t_grads and method.steps == official.t


def test_every_task_per_step_through_aggregate_matches_the_official_operator_given_every_index():
    """What the registry's property suite calls: ``aggregate`` on J updates every momentum."""
    sequence = gradient_sequence(5, 4, seed=1)
    official, method = OfficialPseudoMomentum(4, beta_1=0.8, beta_2=0.99), MConFIG(beta_1=0.8, beta_2=0.99)
    for jac in sequence:
        expected = official.calculate_gradient([0, 1, 2, 3], list(jac))
        step, _ = method.aggregate(blocks(jac), None, torch.ones(4), None, None)
        np.testing.assert_allclose(flat(step), expected, rtol=1e-8, atol=1e-12)
    assert method.next_task == 0


def test_the_weights_are_the_config_weights_of_the_bias_corrected_momenta():
    """The logged weights a: d = Σ_j a_j m̂_j is ConFIG's direction of the m̂_j (before the normalisation)."""
    method = MConFIG()
    sequence = gradient_sequence(7, 3, seed=2)
    for s, gradients in enumerate(sequence):
        _, a = method.momentum_step([s % 3], blocks(gradients[[s % 3]]), 3)
    momenta = torch.cat([m.reshape(3, -1) for m in method.momenta], 1)
    m_hat = momenta / (1 - 0.9 ** torch.tensor(method.updates, dtype=torch.float64)).unsqueeze(1)
    np.testing.assert_allclose((a @ m_hat).numpy(), official_config(m_hat.numpy()), rtol=1e-9, atol=1e-12)


def test_a_common_rescaling_leaves_the_steps_and_the_weights_scale_free():
    sequence = gradient_sequence(6, 3, seed=3)
    plain, scaled = MConFIG(), MConFIG()
    for s, gradients in enumerate(sequence):
        step, _ = plain.momentum_step([s % 3], blocks(gradients[[s % 3]]), 3)
        step_scaled, _ = scaled.momentum_step([s % 3], blocks(100.0 * gradients[[s % 3]]), 3)
        np.testing.assert_allclose(flat(step_scaled), flat(step), rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ one task backward per step
class CountEncoderBackwards(pl.Callback):
    """Counts the gradients that reach the output of the encoder's first layer (every backward
    through the shared encoder reaches it), per training step."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.per_step: list[int] = []
        self._count = 0
        layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._seen)

    def _seen(self, grad: torch.Tensor) -> None:
        self._count += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(self._count)
        self._count = 0


@pytest.mark.parametrize("method,per_step", [
    (MConFIG, 1), (partial(MConFIG, heads="chosen"), 1), (partial(MConFIG, tasks_per_step=2, batched=False), 2),
    (partial(ConFIG, batched=False), 3),  # the hook sees every task backward through the encoder
], ids=["MConFIG", "MConFIG-chosen-heads", "MConFIG-two-tasks", "ConFIG"])
def test_a_step_backpropagates_only_the_chosen_task_through_the_shared_encoder(method, per_step):
    module = make_module()
    counter = CountEncoderBackwards(module.encoder.net[0])
    quiet_trainer(callbacks=[method(), counter], max_steps=6).fit(module, loader(make_batches(6, 16)))
    assert counter.per_step == [per_step] * 6


class NoLoop:
    """A backend without DDP, loss scaling or optimizer: one micro-batch's balancing only."""

    world_size, global_rank = 1, 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self) -> Any:
        return contextlib.nullcontext()

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def loss_scale(self, device: torch.device) -> None:
        return None

    def optimizer_step(self) -> None:
        raise AssertionError("not stepped here")


@pytest.mark.parametrize("heads", ["all", "chosen"])
@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in NO_SHARED])
def test_every_architecture_gets_the_momentum_step_of_the_chosen_task_and_its_head_gradients(name, heads):
    """Three steps (tasks a, b, c in turn) on one batch without moving the parameters: the shared
    parameters get the official operator's step on the chosen task's gradient; every task's own
    parameters their task's gradient (``heads="all"``) or only the chosen task's (``"chosen"``)."""
    module = zoo_build(name).double()
    data = {k: v.double() if v.is_floating_point() else v for k, v in zoo_batch().items()}
    shared, unshared = module.shared_parameters(), module.unshared_parameters()
    names = module.task_names
    method = MConFIG(heads=heads)
    step = MultiTaskStep(module, NoLoop())
    official = OfficialPseudoMomentum(3)
    for s in range(3):
        for p in module.parameters():
            p.grad = None
        _, _, losses = module.compute_losses(data)
        chosen = names[s % 3]
        own = torch.autograd.grad(losses[chosen], [*shared, *unshared], retain_graph=True, allow_unused=True)
        total = losses[chosen] if heads == "chosen" else sum(losses.values())
        head_expected = torch.autograd.grad(total, unshared, allow_unused=True)
        expected = official.calculate_gradient([s % 3], [torch.cat([g.reshape(-1) for g in own[: len(shared)]]).numpy()])
        method.backward(step.context(data, module.training_losses(data), s, 0, True))
        got = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
        # atol: the operator's unit-length step, where the official float64 arithmetic leaves ~1e-9 on
        # components that are exactly zero (a frozen-LoRA adapter's A before B has moved)
        np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-8)
        for p, g in zip(unshared, head_expected):
            torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g, rtol=1e-9, atol=1e-12)
    assert np.abs(got).max() > 0 and method.next_task == 0
    if heads == "chosen":  # task a's own parameters got nothing at step 3 (task c's)
        task_a = module.task_parameters("a")
        assert all(p.grad is None or not p.grad.any() for p in task_a)


# ------------------------------------------------------------------------ training, end to end
def _double_batches(steps: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in make_batches(steps, 16)]


@pytest.mark.parametrize("heads,per_step", [("all", 1), ("chosen", 1), ("all", 2)])
def test_training_equals_sgd_on_the_official_operator_with_the_tasks_in_turn(heads, per_step):
    """Lightning, float64, SGD without momentum (the official M-ConFIG optimizer) against a plain loop:
    each step backpropagates the next ``per_step`` tasks (``OrderedSliceSelector``) through the shared
    parameters into the official operator; the heads get ∂(Σ_t L_t)/∂θ (the official MTL trainer) or
    their chosen task's gradient only."""
    lr, steps = 0.05, 8
    batches = _double_batches(steps)
    module = make_module()
    module.optimizer_factory = partial(torch.optim.SGD, lr=lr)  # no momentum: the update is lr × the step
    method = MConFIG(heads=heads, tasks_per_step=per_step)
    quiet_trainer(callbacks=[method], max_steps=steps, precision="64-true").fit(module, loader(batches))

    reference = make_module().double()
    shared, unshared = reference.shared_parameters(), reference.unshared_parameters()
    official, slices = OfficialPseudoMomentum(3), OfficialOrderedSlices()
    for b in batches:
        _, _, losses = reference.compute_losses(b)
        values = list(losses.values())
        indexes = slices.select(per_step, 3)
        shared_grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(values[i], shared, retain_graph=True)])
                        for i in indexes]
        head_loss = sum(values[i] for i in indexes) if heads == "chosen" else sum(values)
        head_grads = torch.autograd.grad(head_loss, unshared, allow_unused=True)
        update = torch.tensor(official.calculate_gradient(indexes, [g.numpy() for g in shared_grads]))
        with torch.no_grad():
            start = 0
            for p in shared:
                p -= lr * update[start:start + p.numel()].view_as(p)
                start += p.numel()
            for p, g in zip(unshared, head_grads):
                if g is not None:
                    p -= lr * g
    torch.testing.assert_close(flat_parameters(module), flat_parameters(reference), rtol=0, atol=1e-10)
    assert float((flat_parameters(module) - flat_parameters(make_module()).double()).abs().max()) > 1e-3
    assert method.updates == official.t_grads and method.next_task == slices.start_index


@pytest.mark.slow
def test_mconfig_learns_multidigits():
    """Two digit tasks, SGD (as the official M-ConFIG experiments), each task's gradient every other step."""
    result = fit_two_digit_tasks(MConFIG(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    assert result["val/left/accuracy"] > 0.35 and result["val/right/accuracy"] > 0.35  # chance: 0.1


# --------------------------------------------------------------------------------- fp16, state
def _fp16(scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6))


def test_fp16_loss_scale_does_not_change_the_steps():
    """The momenta hold unscaled gradients: scale 1 and 2^12 train the same model."""
    batches = make_batches(6, 16)
    runs = []
    for scale in (1.0, 2.0**12):
        module, method = make_module(), MConFIG()
        quiet_trainer(callbacks=[method], max_steps=6, plugins=[_fp16(scale)]).fit(module, loader(batches))
        runs.append((flat_parameters(module), method.momenta[0]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=2e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-2, atol=1e-4)


def test_fp16_overflow_skips_the_step_and_keeps_the_state_and_the_turn():
    module, method = make_module(), MConFIG()
    before = flat_parameters(module)
    plugin = _fp16(2.0**126)
    quiet_trainer(callbacks=[method], max_steps=1, plugins=[plugin]).fit(module, loader(make_batches(1, 16)))
    torch.testing.assert_close(flat_parameters(module), before, rtol=0, atol=0)
    assert plugin.scaler.get_scale() < 2.0**126
    assert method.momenta is None and method.next_task == 0 and method.steps == 0  # task 0 is computed again


def test_the_state_resumes_the_turn_and_continues_bit_for_bit():
    sequence = gradient_sequence(9, 3, seed=4)
    running = MConFIG()
    for s in range(4):
        running.momentum_step(running.scheduled_tasks(3), blocks(sequence[s][[s % 3]]), 3)
    state = running.state_dict()
    assert (state["next_task"], state["updates"], state["steps"]) == (1, [2, 1, 1], 2)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = MConFIG()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for s in range(4, 9):
        tasks = resumed.scheduled_tasks(3)
        assert tasks == running.scheduled_tasks(3) == [s % 3]
        (a, *_), wa = running.momentum_step(tasks, blocks(sequence[s][tasks]), 3)
        (b, *_), wb = resumed.momentum_step(tasks, blocks(sequence[s][tasks]), 3)
        assert torch.equal(a, b) and torch.equal(wa, wb)


def test_momenta_of_another_model_are_a_clear_error():
    method = MConFIG()
    method.momentum_step([0], blocks(gradient_sequence(1, 3)[0][[0]]), 3)
    with pytest.raises(ValueError, match=r"MConFIG holds the momenta of 3 tasks .* shapes \[\(3, 4\), \(5,\)\]"):
        method.momentum_step([0], [torch.ones(1, 7, dtype=torch.float64)], 3)
    with pytest.raises(ValueError, match="MConFIG holds the momenta of 3 tasks"):
        method.momentum_step([0], blocks(gradient_sequence(1, 4)[0][[0]]), 4)


def test_ddp_ranks_hold_the_same_state(tmp_path):
    """2 gloo processes on different data: the chosen task's gradient is all-reduced before the
    momentum update, so the momenta, counters and turn are identical on both ranks."""
    from test_balancing_ddp import SaveRankState, make_loader

    pl.seed_everything(0)
    module = MultiTaskModule(MLP(6, (8,)), [ClassificationTask("a", 2), ClassificationTask("b", 2)],
                             optimizer=partial(torch.optim.SGD, lr=0.01))
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=5,
                         callbacks=[MConFIG(), SaveRankState(str(tmp_path))], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, make_loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["local_losses"] != ranks[1]["local_losses"]  # the ranks really saw different data
    states = [r["state"] for r in ranks]
    assert states[0]["updates"] == states[1]["updates"] == [3, 2] and states[0]["next_task"] == 1
    for key in ("momenta", "second_moment", "pseudo_momentum"):
        for x, y in zip(states[0][key], states[1][key]):
            assert torch.equal(x, y) and bool(x.any())


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,message", [
    ({"beta_1": 1.0}, r"MConFIG: beta_1 and beta_2 must be in \[0, 1\)"),
    ({"beta_2": -0.1}, r"MConFIG: beta_1 and beta_2 must be in \[0, 1\)"),
    ({"eps": 0.0}, "MConFIG: eps must be > 0"),
    ({"tasks_per_step": 0}, "MConFIG: tasks_per_step must be an integer >= 1"),
    ({"tasks_per_step": 1.5}, "MConFIG: tasks_per_step must be an integer >= 1"),
    ({"heads": "some"}, r"MConFIG: heads='some' is not supported; choose one of \['all', 'chosen'\]"),
    ({"mode": "rep"}, r"MConFIG: mode='rep' is not supported; choose one of \['param'\]"),
])
def test_bad_options_name_the_method_and_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        MConFIG(**options)


def test_more_tasks_per_step_than_tasks_is_an_error_at_setup():
    with pytest.raises(ValueError, match="MConFIG: tasks_per_step=4 is more than the model's 3 tasks"):
        quiet_trainer(callbacks=[MConFIG(tasks_per_step=4)], max_steps=1).fit(make_module(), loader(make_batches(1, 8)))


def test_missing_task_in_a_batch_names_it():
    batch = make_batches(1, 8)[0]
    batch["b"] = torch.full_like(batch["b"], -100)  # no labelled sample for task b
    with pytest.raises(ValueError, match=r"MConFIG needs the loss of every task.*\['b'\]"):
        quiet_trainer(callbacks=[MConFIG()], max_steps=1).fit(make_module(), loader([batch]))
