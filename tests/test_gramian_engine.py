"""The Gramian engine of param mode (``engine="gramian"``): M = JJᵀ streamed out of one vmapped backward
without the T×P Jacobian, then one backward of the weighted rows.

References are the materialised Jacobian of :func:`task_jacobian` (one autograd call per loss) and, for the
aggregation semantics (accumulation, DDP), updates computed by hand from each micro-batch's / rank's own
Jacobian. Models are float64; the engines' Gramians are float32 by design (``gramian``), so quantities
that go through a Gramian are compared at float32 precision and the rest tightly.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from architecture_zoo import batch as zoo_batch
from architecture_zoo import build as zoo_build
from gradient_helpers import loader, make_batches, make_module, split
from helpers import quiet_trainer, run_ddp_worker
from mtl_lightning import MultiTaskModule, RegressionTask
from mtl_lightning.core import MultiTaskStep
from mtl_lightning.core import engine as engine_module
from mtl_lightning.core.engine import (
    combine, flatten_jacobian, gramian, per_task_gradients, per_task_gramian, streamed_gramian, task_jacobian,
)
from mtl_lightning.data import TensorDictDataset
from mtl_lightning.data.datamodule import collate_batched
from mtl_lightning.gradients import (
    CRMOGM, DBMTL, MGDA, ExcessMTL, GradDrop, MConFIG, MoCo, MoDo, NashMTL, UPGrad,
)
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.models import MLP
from mtl_lightning.registry import gradient_methods

HERE = Path(__file__).parent
HAS_TORCHJD = importlib.util.find_spec("torchjd") is not None
#: The registered methods whose update is not Jᵀw with w a function of the Gramian and the losses.
NOT_GRAMIAN_WEIGHTINGS = {"GradDrop": GradDrop, "DBMTL": DBMTL, "ExcessMTL": ExcessMTL, "MConFIG": MConFIG,
                          "MoCo": MoCo, "MoDo": MoDo}


# ------------------------------------------------------------------------------------------ helpers
class NoLoop:
    """A backend without DDP or optimizer, with an optional fp16 loss scale S."""

    world_size, global_rank = 1, 0

    def __init__(self, scale: Optional[float] = None) -> None:
        self.scale = scale

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self) -> Any:
        return contextlib.nullcontext()

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        return tensor

    def loss_scale(self, device: torch.device) -> Optional[Tensor]:
        return None if self.scale is None else torch.tensor(self.scale, device=device)

    def optimizer_step(self) -> None:
        raise AssertionError("not stepped here")


def record_weights(method: GradientBalancer) -> list[tuple[Tensor, Tensor]]:
    """(Gramian, weights) of every call of the method's ``step_weights`` (what both engines call)."""
    calls: list[tuple[Tensor, Tensor]] = []
    original = method.step_weights

    def recording(gramian: Tensor, losses: Tensor, ctx: Any) -> Tensor:
        weights = original(gramian, losses, ctx)
        calls.append((gramian.detach().clone(), weights.detach().clone()))
        return weights

    method.step_weights = recording  # type: ignore[method-assign]
    return calls


def double(data: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in data.items()}


def backward_once(module: MultiTaskModule, method: GradientBalancer, data: dict[str, Tensor],
                  backend: Optional[NoLoop] = None) -> list[Tensor]:
    """The ``.grad`` one micro-batch's backward writes on every parameter, from zero."""
    for p in module.parameters():
        p.grad = None
    step = MultiTaskStep(module, backend or NoLoop())
    method.backward(step.context(data, module.training_losses(data), 0, 0, True))
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def jacobian_and_head_gradients(module: MultiTaskModule, data: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
    """The reference: J (T, P_shared) from one autograd call per loss, Σ_t ∂L_t/∂θ of every unshared
    parameter, and the losses."""
    forward = module.training_losses(data)
    losses = [forward.losses[n] for n in module.task_names]
    shared, unshared = module.shared_parameters(), module.unshared_parameters()
    jacobian = flatten_jacobian(task_jacobian(losses, shared, batched=False))
    heads = torch.autograd.grad(torch.stack(losses).sum(), unshared, allow_unused=True)
    return jacobian, [torch.zeros_like(p) if g is None else g for g, p in zip(heads, unshared)], torch.stack(losses).detach()


def expected_gradients(module: MultiTaskModule, shared_direction: Tensor, head_gradients: list[Tensor]) -> list[Tensor]:
    """Per parameter of the module (in ``parameters()`` order): the flat shared direction unflattened, the
    unshared gradients as given."""
    by_id: dict[int, Tensor] = {}
    start = 0
    for p in module.shared_parameters():
        by_id[id(p)] = shared_direction[start:start + p.numel()].view_as(p)
        start += p.numel()
    by_id.update({id(p): g for p, g in zip(module.unshared_parameters(), head_gradients)})
    return [by_id[id(p)] for p in module.parameters()]


def assert_all_close(got: list[Tensor], want: list[Tensor], rtol: float, atol_fraction: float) -> None:
    """Every tensor close, with ``atol`` a fraction of the largest entry of ``want``."""
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol_fraction * scale, msg=lambda m, i=i: f"tensor {i}: {m}")


# ------------------------------------------------------------------------- 1. streamed_gramian
def _tied_model():
    """An encoder whose last weight is read twice, a shared parameter the losses never reach, heads, and
    a head parameter no loss reaches either."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64))
    heads = [nn.Linear(6, 2).double() for _ in range(3)]
    unused_head = nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    x = torch.randn(9, 5, dtype=torch.float64)

    def losses() -> list[Tensor]:
        tied = encoder[2].weight
        z = torch.tanh(encoder(x)) @ tied.T
        return [((h(z) - i) ** 2).mean() * (i + 1) for i, h in enumerate(heads)]

    shared = [*encoder.parameters(), unused]
    return encoder, shared, [*(p for h in heads for p in h.parameters()), unused_head], losses


def test_streamed_gramian_is_the_jacobians_gramian_with_a_tied_and_an_unused_parameter(monkeypatch):
    encoder, shared, materialize, losses = _tied_model()
    blocks = task_jacobian(losses(), shared, batched=False)
    jacobian = flatten_jacobian(blocks)
    expected_rows = task_jacobian(losses(), materialize, batched=False)
    tied = float(gramian([blocks[2]]).trace())  # blocks[2]: encoder[2].weight
    assert blocks[-1].abs().sum() == 0 and tied > 0.3 * float(gramian(blocks).trace())  # the tied weight weighs

    streamed_blocks: list[tuple[int, ...]] = []
    add = engine_module._GramianAccumulator.add
    monkeypatch.setattr(engine_module._GramianAccumulator, "add",
                        lambda self, block: (streamed_blocks.append(tuple(block.shape)), add(self, block))[1])
    stacked = torch.stack(losses())
    matrix, rows = streamed_gramian(stacked, torch.eye(3, dtype=stacked.dtype), shared, materialize)

    assert matrix.shape == (3, 3) and matrix.dtype == torch.float32
    reference = jacobian @ jacobian.T
    torch.testing.assert_close(matrix.double(), reference, rtol=1e-6, atol=1e-7 * float(reference.diagonal().max()))
    # Only the materialised rows come back, equal to the per-loss gradients (zeros for the unused one).
    assert len(rows) == len(materialize)
    for got, want in zip(rows, expected_rows):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert rows[-1].shape == (3, 2, 4) and not rows[-1].any()
    # Each reached parameter's T rows arrive once (the tied weight's summed over both reads) and are
    # dropped; the unused one never arrives; nothing lands in .grad.
    assert sorted(streamed_blocks) == sorted((3, *p.shape) for p in encoder.parameters())
    assert all(p.grad is None for p in [*shared, *materialize])


def test_streamed_gramian_of_an_output_that_reaches_no_input_is_zero():
    torch.manual_seed(0)
    other, idle = (nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(2))
    output = torch.randn(4, 3, dtype=torch.float64) * other
    matrix, rows = streamed_gramian(output, torch.randn(2, 4, 3, dtype=torch.float64), [idle])
    assert rows == [] and torch.equal(matrix, torch.zeros(2, 2))


# ------------------------------------------------------------------------- 2. per_task_gramian
def _features_setup(kind: str) -> tuple[list[Tensor], list[Tensor], Callable[[], tuple[Any, list[Tensor], Any]]]:
    """An encoder and three heads on one representation (``"representation"``), on its aliases
    (``"aliases"``), or on features by task with a task-own parameter (``"by_task"``)."""
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU()).double()
    heads = [nn.Linear(5, 3).double() for _ in range(3)]
    own = nn.Parameter(torch.randn(5, dtype=torch.float64))
    x = torch.randn(7, 6, dtype=torch.float64)
    ys = [torch.randint(3, (7,)) for _ in range(3)]

    def forward() -> tuple[Any, list[Tensor], Any]:
        z = encoder(x)
        if kind == "by_task":
            features = {"a": z, "b": torch.tanh(z) * own, "c": z * z}
            reads, head_inputs = list(features.values()), None
            features_out: Any = features
        else:
            reads = [z.view_as(z) for _ in heads] if kind == "aliases" else [z] * 3
            head_inputs = reads if kind == "aliases" else None
            features_out = z
        losses = [nn.functional.cross_entropy(h(r), y) for h, r, y in zip(heads, reads, ys)]
        return features_out, losses, head_inputs

    unshared = [p for h in heads for p in h.parameters()] + ([own] if kind == "by_task" else [])
    return list(encoder.parameters()), unshared, forward


@pytest.mark.parametrize("kind", ["representation", "aliases", "by_task"])
def test_per_task_gramian_matches_the_jacobian_engine(kind):
    shared, unshared, forward = _features_setup(kind)
    features, losses, head_inputs = forward()
    blocks, unshared_grads = per_task_gradients(losses, features, shared, unshared, "param", head_inputs=head_inputs)
    jacobian = flatten_jacobian(blocks)
    assert bool((jacobian.norm(dim=1) > 0).all())  # every task reaches the shared parameters

    features, losses, head_inputs = forward()
    matrix, got_unshared, weighted_gradient = per_task_gramian(losses, features, shared, unshared, head_inputs)
    reference = jacobian @ jacobian.T
    torch.testing.assert_close(matrix.double(), reference, rtol=1e-6, atol=1e-7 * float(reference.diagonal().max()))
    assert len(got_unshared) == len(unshared)
    for got, want in zip(got_unshared, unshared_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64)
    for got, want in zip(weighted_gradient(weights), combine(weights, blocks)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# -------------------------------------------------- 3. both engines write the same gradients
def _gramian_weightings() -> dict[str, Callable[[str], GradientBalancer]]:
    methods: dict[str, Callable[[str], GradientBalancer]] = {
        name: partial(lambda engine, cls: cls(engine=engine), cls=cls)
        for name, cls in gradient_methods().items() if cls().weights_from_gramian
    }
    methods["CRMOGM-UPGrad"] = lambda engine: CRMOGM(UPGrad(engine=engine), alpha=0.5)
    if HAS_TORCHJD:
        from mtl_lightning.gradients.torchjd_adapter import TorchJDWeighting

        methods["TorchJD-UPGradWeighting"] = lambda engine: TorchJDWeighting("UPGradWeighting", engine=engine)
    return methods


GRAMIAN_WEIGHTINGS = _gramian_weightings()


def test_the_gramian_weightings_are_the_registered_methods_but_those_that_read_the_jacobian():
    registered = gradient_methods()
    assert {n for n, cls in registered.items() if not cls().weights_from_gramian} == set(NOT_GRAMIAN_WEIGHTINGS)
    assert set(registered) - set(NOT_GRAMIAN_WEIGHTINGS) <= set(GRAMIAN_WEIGHTINGS)


#: Hard sharing (one representation, heads on aliases), MMoE (a representation mixed per task by
#: gates, task-own gate parameters) and cross-stitch (features by task, no shared representation).
ARCHITECTURES = ["hard_sharing", "mmoe", "cross_stitch"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", list(GRAMIAN_WEIGHTINGS))
def test_one_step_writes_the_jacobian_engines_gradients(method, arch):
    """From one start and fresh instances (equal warm starts and random streams): the Gramian engine's
    update is Jᵀw for the weights it chose (heads: Σ_t ∂L_t/∂θ), and equals the Jacobian engine's up to
    the float32 Gramian. Jᵀw is exact with a shared representation (w weights the float64 rows ∂L_t/∂z);
    with features by task w weights the stacked losses, which the tasks compute in float32: w is rounded
    to float32 there (~6e-8 relative). Both engines form M in float32 (``gramian`` upcasts to it), summed in a
    different order: M agrees to ~1e-7 relative, the solvers move the weights by about as much times the
    conditioning (≤ 4e-7 of the largest gradient entry observed here, over every method and
    architecture), far below the O(1) error of a wrong weight or a missing term."""
    module = zoo_build(arch).double()
    data = double(zoo_batch())
    gramian_method, jacobian_method = GRAMIAN_WEIGHTINGS[method]("gramian"), GRAMIAN_WEIGHTINGS[method]("jacobian")
    assert gramian_method.engine == "gramian" and jacobian_method.engine == "jacobian"
    gramian_calls, jacobian_calls = record_weights(gramian_method), record_weights(jacobian_method)
    got = backward_once(module, gramian_method, data)
    want = backward_once(module, jacobian_method, data)

    jacobian, heads, _ = jacobian_and_head_gradients(module, data)
    (streamed, weights), = gramian_calls
    (materialised, _), = jacobian_calls
    reference = jacobian @ jacobian.T
    torch.testing.assert_close(streamed, reference, rtol=1e-6, atol=1e-7 * float(reference.diagonal().max()))
    torch.testing.assert_close(streamed, materialised, rtol=1e-6, atol=1e-7 * float(reference.diagonal().max()))
    exact = isinstance(module.training_losses(data).features, Tensor)
    assert exact == (arch != "cross_stitch")
    assert_all_close(got, expected_gradients(module, weights.to(jacobian.dtype) @ jacobian, heads),
                     rtol=1e-10 if exact else 1e-6, atol_fraction=1e-12 if exact else 1e-7)
    assert_all_close(got, want, rtol=1e-5, atol_fraction=1e-5)


# ------------------------------------------------------------------------------- 4. the errors
@pytest.mark.parametrize("factory,error,message", [
    (lambda: UPGrad(engine="hessian"), ValueError, r"UPGrad: engine='hessian' is not one of \['jacobian', 'gramian'\]"),
    (lambda: UPGrad(mode="rep", engine="gramian"), ValueError, r"UPGrad: engine='gramian' is for param mode"),
    (lambda: MGDA(batched=False, engine="gramian"), ValueError, r"MGDA: engine='gramian' .* needs batched=True"),
    (lambda: CRMOGM(mode="rep", engine="gramian"), ValueError, r"MGDA: engine='gramian' is for param mode"),
    (lambda: CRMOGM(UPGrad(), engine="gramian"), ValueError,
     r"CRMOGM runs as the method it wraps: engine='gramian', but UPGrad has engine='jacobian'"),
], ids=["unknown", "rep-mode", "not-batched", "CRMOGM-rep", "CRMOGM-mismatch"])
def test_bad_engine_options_raise_at_construction(factory, error, message):
    with pytest.raises(error, match=message):
        factory()


def _fit_one_step(method: GradientBalancer, arch: str = "hard_sharing") -> None:
    quiet_trainer(callbacks=[method], max_steps=1).fit(zoo_build(arch), loader([zoo_batch()]))


@pytest.mark.parametrize("name", list(NOT_GRAMIAN_WEIGHTINGS))
def test_a_method_that_reads_the_jacobian_has_no_gramian_engine(name):
    """These methods take no ``engine`` option; forced onto the engine, setup refuses them by name."""
    cls = NOT_GRAMIAN_WEIGHTINGS[name]
    with pytest.raises(TypeError, match="engine"):
        cls(engine="gramian")
    method = cls()
    method.engine = "gramian"
    with pytest.raises(ValueError, match=rf"{name} computes its update from the Jacobian itself .* engine='gramian'"):
        _fit_one_step(method)


class OwnAggregate(UPGrad):
    """A weighting whose update is not Jᵀw of its weights."""

    def aggregate(self, jacobian, gramian, losses, scale, ctx):
        return super().aggregate(jacobian, gramian, losses, scale, ctx)


@pytest.mark.skipif(not HAS_TORCHJD, reason="torchjd is not installed")
def test_a_torchjd_weighting_of_the_jacobian_is_refused_at_setup():
    from mtl_lightning.gradients.torchjd_adapter import TorchJDWeighting

    method = TorchJDWeighting("UPGradWeighting", stat="matrix", engine="gramian")
    with pytest.raises(ValueError, match=rf"{method.name} computes its update from the Jacobian itself"):
        _fit_one_step(method)


def test_a_method_with_its_own_aggregate_is_refused_at_setup():
    with pytest.raises(ValueError, match="UPGrad computes its update from the Jacobian itself|OwnAggregate computes"):
        _fit_one_step(OwnAggregate(engine="gramian"))


def test_an_architecture_with_a_pass_per_task_is_refused_at_setup_and_at_backward():
    with pytest.raises(ValueError, match=r"UPGrad: engine='gramian' runs one vmapped backward, and PerTaskLoRA"):
        _fit_one_step(UPGrad(engine="gramian"), "per_task_lora")
    with pytest.raises(ValueError, match=r"UPGrad: engine='gramian' .* PerTaskLoRA .* use engine='jacobian'"):
        backward_once(zoo_build("per_task_lora"), UPGrad(engine="gramian"), zoo_batch())


# --------------------------------------------------------------------------- 5. fp16 loss scaling
@pytest.mark.parametrize("method", [UPGrad, NashMTL], ids=["UPGrad", "NashMTL"])
def test_a_loss_scale_scales_the_gradients_and_leaves_the_weights(method):
    """Under a loss scale S the written gradients are S × the unscaled ones and the method sees the
    unscaled Gramian (Nash-MTL's weights would move with its scale). S is a power of two: exact."""
    module = zoo_build("hard_sharing").double()
    data = double(zoo_batch())
    scale = 2.0**12
    plain, scaled = method(engine="gramian"), method(engine="gramian")
    plain_calls, scaled_calls = record_weights(plain), record_weights(scaled)
    unscaled = backward_once(module, plain, data)
    got = backward_once(module, scaled, data, NoLoop(scale))
    (m_plain, w_plain), = plain_calls
    (m_scaled, w_scaled), = scaled_calls
    torch.testing.assert_close(m_scaled, m_plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(w_scaled, w_plain, rtol=1e-12, atol=0)
    assert_all_close(got, [scale * g for g in unscaled], rtol=1e-12, atol_fraction=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_gramian_is_float32_under_autocast(dtype):
    """Under mixed precision the Gramian is still float32 math: its products run inside the backward,
    where autocast would make them fp16 (overflowing under a loss scale) or bf16 (3 digits)."""
    module = zoo_build("hard_sharing")
    data = zoo_batch()
    method = UPGrad(engine="gramian")
    calls = record_weights(method)
    with torch.autocast("cpu", dtype=dtype):
        backward_once(module, method, data, NoLoop(2.0**12))
        jacobian, _, _ = jacobian_and_head_gradients(module, data)  # the same forward: backward is not autocast
    (seen, _), = calls
    reference = jacobian.double() @ jacobian.double().T
    torch.testing.assert_close(seen, reference, rtol=1e-5, atol=1e-6 * float(reference.diagonal().max()))


def _fp16(scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6))


def _train(method: GradientBalancer, batches: list[dict[str, Tensor]], **trainer_kwargs: Any) -> Tensor:
    module = make_module()
    quiet_trainer(callbacks=[method], max_epochs=1, **trainer_kwargs).fit(module, loader(batches))
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.one_thread
def test_fp16_training_under_a_loss_scale_equals_scale_one():
    batches = make_batches(3, 16)
    unit = _train(NashMTL(engine="gramian"), batches, plugins=[_fp16(1.0)])
    scaled = _train(NashMTL(engine="gramian"), batches, plugins=[_fp16(2.0**12)])
    start = torch.cat([p.detach().reshape(-1) for p in make_module().parameters()])
    assert (unit - start).abs().max() > 1e-3
    torch.testing.assert_close(scaled, unit, rtol=0, atol=2e-4)


@pytest.mark.one_thread
def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    module = make_module()
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    plugin = _fp16(2.0**126)
    quiet_trainer(callbacks=[UPGrad(engine="gramian")], max_steps=1, plugins=[plugin]).fit(module, loader(make_batches(1, 16)))
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in module.parameters()]), before, rtol=0, atol=0)
    assert plugin.scaler.get_scale() < 2.0**126


# --------------------------------------------------------------------------- 6. accumulation
@pytest.mark.parametrize("method", [UPGrad, NashMTL], ids=["UPGrad", "NashMTL"])
def test_accumulation_averages_each_micro_batchs_own_update(method):
    """Two micro-batches: the step is ½ Σ_k (J_kᵀ w_k, Σ_t ∂L_t/∂θ on k), each w_k from micro-batch k's own
    Gramian and losses (as rep mode), not the weights of the averaged J (param mode's Jacobian engine)."""
    module = zoo_build("hard_sharing").double()
    full = double(zoo_batch(16))
    micro = [split([full], 2, k)[0] for k in range(2)]
    engine_method = method(engine="gramian")
    calls = record_weights(engine_method)
    for p in module.parameters():
        p.grad = None
    step = MultiTaskStep(module, NoLoop(), accumulate_grad_batches=2)
    for k, data in enumerate(micro):
        engine_method.backward(step.context(data, module.training_losses(data), 0, 0, is_last_microbatch=k == 1))
    got = [p.grad.clone() for p in module.parameters()]

    reference = method()  # its own weights from each micro-batch's exact Gramian, in the same order
    direction, heads = 0.0, None
    for (gramian_k, weights_k), data in zip(calls, micro):
        jacobian, head_grads, losses = jacobian_and_head_gradients(module, data)
        exact = jacobian @ jacobian.T
        torch.testing.assert_close(gramian_k, exact, rtol=1e-6, atol=1e-7 * float(exact.diagonal().max()))
        torch.testing.assert_close(weights_k, reference.weights(exact, losses.float()), rtol=1e-5, atol=1e-7)
        direction = direction + 0.5 * (weights_k @ jacobian)
        heads = [0.5 * g for g in head_grads] if heads is None else [h + 0.5 * g for h, g in zip(heads, head_grads)]
    assert len(calls) == 2
    assert_all_close(got, expected_gradients(module, direction, heads), rtol=1e-10, atol_fraction=1e-12)

    # The Jacobian engine weights the averaged J once: a different update here.
    for p in module.parameters():
        p.grad = None
    jacobian_method = method()
    for k, data in enumerate(micro):
        jacobian_method.backward(step.context(data, module.training_losses(data), 0, 0, is_last_microbatch=k == 1))
    averaged = [p.grad for p in module.parameters()]
    difference = max(float((a - b).abs().max()) for a, b in zip(got, averaged))
    assert difference > 1e-3 * max(float(g.abs().max()) for g in got)


# ------------------------------------------------------------------------------------ 7. DDP
@pytest.mark.slow
def test_ddp_weights_come_from_the_mean_of_the_ranks_gramians(tmp_path):
    """Two gloo processes, one step each on its half of a batch (float64, plain SGD): both ranks end
    identical, the method saw the mean of the ranks' local Gramians (with the mean losses), and the step
    is −lr × the mean over ranks of each rank's J_rᵀw (heads: of its Σ_t ∂L_t/∂θ)."""
    from ddp_gramian_worker import LR, METHODS, batch, start

    results = run_ddp_worker("ddp_gramian_worker.py", tmp_path)
    module = start().double()
    initial = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(results["reference"]["parameters"].double(), initial, rtol=0, atol=0)
    halves = [split([batch()], 2, r)[0] for r in range(2)]
    per_rank = [jacobian_and_head_gradients(module, data) for data in halves]
    mean_gramian = sum(j @ j.T for j, _, _ in per_rank) / 2
    mean_losses = (per_rank[0][2] + per_rank[1][2]) / 2
    for name, factory in METHODS.items():
        ranks = [results[f"rank{r}"][name] for r in range(2)]
        assert torch.equal(ranks[0]["parameters"], ranks[1]["parameters"]), name
        assert torch.equal(ranks[0]["weights"], ranks[1]["weights"]), name
        seen = ranks[0]["gramian"]
        # float32 products (the engine's Gramian), summed in an order that depends on the threads
        torch.testing.assert_close(seen, mean_gramian, rtol=1e-5, atol=1e-6 * float(mean_gramian.diagonal().max()))
        weights = ranks[0]["weights"]
        torch.testing.assert_close(weights, factory().weights(seen, mean_losses.float()), rtol=1e-5, atol=1e-7)
        direction = sum(weights @ j for j, _, _ in per_rank) / 2
        heads = [(a + b) / 2 for a, b in zip(per_rank[0][1], per_rank[1][1])]
        step = torch.cat([g.reshape(-1) for g in expected_gradients(module, direction, heads)])
        assert float(step.abs().max()) > 1e-3
        torch.testing.assert_close(ranks[0]["parameters"], initial - LR * step, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ 8. learning
def _two_task_data(n: int = 256) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    data = {"input": x, "a": x[:, 0] - 2 * x[:, 1] + 0.05 * torch.randn(n, generator=g),
            "b": torch.tanh(x[:, 2] + x[:, 0]) + 0.05 * torch.randn(n, generator=g)}
    return torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=32, collate_fn=collate_batched)


@pytest.mark.one_thread
def test_upgrad_with_the_gramian_engine_lowers_both_task_losses():
    pl.seed_everything(0)
    module = MultiTaskModule(MLP(4, (16,)), [RegressionTask("a"), RegressionTask("b")],
                             optimizer=partial(torch.optim.Adam, lr=1e-2))
    data = _two_task_data()
    full = next(iter(torch.utils.data.DataLoader(data.dataset, batch_size=256, collate_fn=collate_batched)))

    def losses() -> dict[str, float]:
        with torch.no_grad():
            return {n: float(v) for n, v in module.compute_losses(full)[2].items()}

    before = losses()
    method = UPGrad(engine="gramian")
    calls = record_weights(method)
    quiet_trainer(callbacks=[method], max_epochs=4, limit_val_batches=0).fit(module, data)
    after = losses()
    assert len(calls) == 32  # 4 epochs of 8 steps, every one through the engine
    assert after["a"] < 0.3 * before["a"] and after["b"] < 0.4 * before["b"], (before, after)


def test_the_engine_is_set_from_yaml(tmp_path):
    from mtl_lightning.cli import MTLCLI

    root = HERE.parent / "experiments" / "multidigits"
    config = tmp_path / "upgrad_gramian.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: mtl_lightning.gradients.UPGrad\n      init_args:\n"
                      "        engine: gramian\n")
    cli = MTLCLI(args=["fit", "--config", str(root / "ew.yaml"), "--config", str(config), "--trainer.fast_dev_run=2",
                       "--trainer.logger=false", "--data.init_args.num_train=256", "--trainer.enable_progress_bar=false"])
    (method,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, UPGrad)]
    assert method.engine == "gramian" and method.mode == "param"
    assert cli.trainer.global_step == 2


# ------------------------------------------------------------------------------- 9. no vmap
@pytest.mark.parametrize("representation", [True, False])
def test_a_graph_the_vmap_cannot_run_falls_back_to_the_held_jacobian(representation, monkeypatch):
    """Where the vmapped backward fails (an op functorch cannot batch), the step says so and computes the
    same Gramian, unshared gradients and weighted gradient from a loop of T backward passes."""
    from mtl_lightning.core import engine

    def build():
        torch.manual_seed(0)
        encoder = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(3))
        x = torch.randn(5, 4)
        z = encoder(x)
        losses = [h(z).pow(2).mean() for h in heads]
        features = z if representation else {f"t{i}": z for i in range(3)}
        return losses, features, list(encoder.parameters()), [p for h in heads for p in h.parameters()]

    weights = torch.tensor([0.2, 0.5, 0.3])
    expected = engine.per_task_gramian(*build())
    reference = (expected[0], expected[1], expected[2](weights))

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: an op without a batching rule")

    monkeypatch.setattr(engine.torch.func, "vmap", broken)
    engine._UNSTREAMABLE_WARNED.clear()
    with pytest.warns(UserWarning, match="engine='gramian': the vmapped backward failed on this graph"):
        matrix, unshared, weighted = engine.per_task_gramian(*build())
    torch.testing.assert_close(matrix, reference[0], rtol=1e-5, atol=1e-7)
    for got, want in zip(unshared, reference[1]):
        torch.testing.assert_close(got, want)
    for got, want in zip(weighted(weights), reference[2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
