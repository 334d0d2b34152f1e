"""The architecture protocol, over every architecture: roles exact and checked by autograd, the
engine's Jacobian over exactly the shared parameters, modes, GradNorm's layer, fine-tuning, groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_lightning.core import MultiTaskStep
from mtl_lightning.models.backend import LightningBackend
from torch import nn

from architecture_zoo import ARCHITECTURES, NO_SHARED, batch, build
from helpers import quiet_trainer
from mtl_lightning.architectures import MMoE, SoftSharing, check_roles
from mtl_lightning.balancing import EqualWeighting, GradNorm
from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.data import TensorDictDataset
from mtl_lightning.data.datamodule import collate_batched
from mtl_lightning.gradients import MGDA, PCGrad, UPGrad
from mtl_lightning.core.engine import flatten_jacobian, gramian, per_task_gradients
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.monitoring import NegativeTransferMonitor
from mtl_lightning.tasks import RegressionTask

ALL = list(ARCHITECTURES)
WITH_SHARED = [n for n in ALL if n not in NO_SHARED]


def loader(size: int = 64, batch_size: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(TensorDictDataset(batch(size)), batch_size=batch_size, collate_fn=collate_batched)


def context(module: MultiTaskModule, b: dict) -> BalancingContext:
    return MultiTaskStep(module, LightningBackend(module)).context(b, module.training_losses(b), 0, 0, True)


@pytest.mark.parametrize("name", ALL)
def test_roles_partition_every_parameter_exactly_once(name):
    module = build(name)
    roles = module.parameter_roles()
    groups = [roles.shared, roles.mixing, *roles.task_own.values(), *[list(h.parameters()) for h in module.heads.values()]]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) == {id(p) for p in module.parameters() if p.requires_grad}  # covering (the module's roles: trainable)
    unshared = module.unshared_parameters()
    assert {id(p) for p in unshared} | {id(p) for p in module.shared_parameters()} == set(ids)
    assert not {id(p) for p in unshared} & {id(p) for p in module.shared_parameters()}


@pytest.mark.parametrize("name", ALL)
def test_declared_roles_agree_with_autograd(name):
    module = build(name)
    reached = check_roles(module, batch())
    own = {n for n, p in module.named_parameters() if any(p is q for q in module.task_parameters("a"))}
    assert own and all(reached[n] == {"a"} for n in own)  # task a's own parts: no other task's gradient
    if name not in NO_SHARED:
        assert module.shared_parameters()


def test_check_roles_catches_a_wrong_declaration():
    module = build("mmoe")
    roles = module.architecture.parameter_roles
    module.architecture.parameter_roles = lambda: type(roles())(  # gates declared shared: wrong
        shared=[*roles().shared, *roles().task_own["a"]], task_own={t: ps for t, ps in roles().task_own.items() if t != "a"})
    with pytest.raises(ValueError, match="declared shared but is reached by \\['a'\\]"):
        check_roles(module, batch())


def test_architecture_with_unassigned_parameter_is_refused():
    class Forgetful(MMoE):
        def parameter_roles(self):
            roles = super().parameter_roles()
            roles.task_own.pop("b")
            return roles

    with pytest.raises(ValueError, match="declares no role .*gates.b"):
        MultiTaskModule(Forgetful(MLP(6, (8,)), 2, 6), [RegressionTask("a"), RegressionTask("b")])


@pytest.mark.parametrize("name", WITH_SHARED)
def test_engine_jacobian_is_exactly_the_shared_parameters_jacobian(name):
    module = build(name)
    b = batch()
    shared = module.shared_parameters()
    _, _, losses = module.compute_losses(b)
    reference = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)]) for t in module.task_names
    ])
    unshared = module.unshared_parameters()
    total = sum(losses.values())
    reference_unshared = torch.autograd.grad(total, unshared, allow_unused=True)
    for mode in module.architecture.supported_modes:
        ctx = context(module, b)
        aliases = None if ctx.head_inputs is None else [ctx.head_inputs.get(t) for t in module.task_names]
        blocks, grads = per_task_gradients([ctx.losses[t] for t in module.task_names], ctx.features, shared, unshared,
                                           mode, True, aliases)
        for got, want in zip(grads, reference_unshared):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-5, atol=1e-6)
        if mode == "param":
            torch.testing.assert_close(flatten_jacobian(blocks), reference, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gramian(blocks), reference @ reference.T, rtol=1e-4, atol=1e-5)
        else:  # rep mode: J w.r.t. z, pulled back through the shared parameters, is the same Jacobian
            z = ctx.features
            pulled = torch.stack([
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, shared, grad_outputs=row, retain_graph=True)])
                for row in blocks[0]
            ])
            torch.testing.assert_close(pulled, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mtan", "ple", "cross_stitch"])
def test_rep_mode_without_a_shared_representation_names_the_architecture(name):
    module = build(name)
    with pytest.raises(ValueError, match=f"{type(module.architecture).__name__}.*supports mode\\(s\\) \\['param'\\]"):
        quiet_trainer(max_steps=1, callbacks=[MGDA(mode="rep")]).fit(module, loader())


def test_gradient_methods_and_monitor_refuse_an_architecture_without_shared_parameters():
    with pytest.raises(ValueError, match="SoftSharing has none"):
        quiet_trainer(max_steps=1, callbacks=[PCGrad()]).fit(build("soft_sharing"), loader())
    with pytest.raises(ValueError, match="SoftSharing has no trainable parameter shared"):
        quiet_trainer(max_steps=1, callbacks=[NegativeTransferMonitor()]).fit(build("soft_sharing"), loader())


@pytest.mark.parametrize("name", WITH_SHARED)
def test_gradnorm_layer_is_shared(name):
    module = build(name)
    layer = GradNorm().layer_parameters(context(module, batch()))
    shared = {id(p) for p in module.shared_parameters()}
    assert layer and all(id(p) in shared for p in layer)
    if name in ("mmoe", "dselect_k"):  # one last layer per expert
        assert len(layer) == 2 * len(module.architecture.experts)


@pytest.mark.parametrize("name", ALL)
def test_every_architecture_learns_with_loss_weighting_and_a_gradient_method(name):
    for method in [EqualWeighting(), PCGrad()] if name not in NO_SHARED else [EqualWeighting()]:
        module = build(name, optimizer=lambda p: torch.optim.Adam(p, lr=2e-2))
        data = loader(128, 32)
        before = quiet_trainer().validate(module, data, verbose=False)[0]["val/loss"]
        quiet_trainer(max_epochs=10, callbacks=[method], limit_val_batches=0).fit(module, data)
        after = quiet_trainer().validate(module, data, verbose=False)[0]["val/loss"]
        assert after < 0.7 * before, (name, method.name, before, after)


def test_soft_sharing_without_coupling_is_independent_single_task_models():
    data = loader(64, 16)
    torch.manual_seed(0)
    joint = MultiTaskModule(SoftSharing(MLP(6, (8,)), strength=0.0), [RegressionTask("a"), RegressionTask("c")],
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    singles = {}
    for task in ("a", "c"):
        single = MultiTaskModule(MLP(6, (8,)), [RegressionTask(task)], optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        single.encoder.load_state_dict(joint.encoder.towers[task].state_dict())
        single.heads[task].load_state_dict(joint.heads[task].state_dict())
        quiet_trainer(max_epochs=3, limit_val_batches=0).fit(single, data)
        singles[task] = single
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(joint, data)
    for task, single in singles.items():
        for mine, theirs in zip(joint.encoder.towers[task].parameters(), single.encoder.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_trace_norm_penalty_is_the_nuclear_norm_of_the_stacked_towers():
    enc = SoftSharing(nn.Linear(3, 2), strength=0.5, penalty="trace_norm")
    enc.bind(["a", "b", "c"])
    expected = 0.0
    for same in zip(*[t.parameters() for t in enc.towers.values()]):
        expected += np.linalg.norm(torch.stack(same).detach().reshape(3, -1).numpy(), ord="nuc")
    assert float(enc.regularization()) == pytest.approx(0.5 * expected, rel=1e-5)


def test_mmoe_reads_the_gate_mixture_of_the_experts():
    module = build("mmoe")
    arch, x = module.architecture, batch()["input"]
    gate = torch.softmax(arch.gates["b"][1](x), dim=-1)
    expected = sum(gate[:, e : e + 1] * expert(x) for e, expert in enumerate(arch.experts))
    torch.testing.assert_close(arch(x)["b"], expected)


def test_ple_roles_follow_the_shared_gate():
    arch = build("ple").architecture  # three levels
    roles = arch.parameter_roles()
    shared, mixing = {id(p) for p in roles.shared}, {id(p) for p in roles.mixing}
    assert all(id(p) in shared for p in arch.task_experts[0]["a"].parameters())  # feeds the shared gate
    assert all(id(p) in {id(q) for q in roles.task_own["a"]} for p in arch.task_experts[2]["a"].parameters())
    assert all(id(p) in {id(q) for q in roles.task_own["a"]} for p in arch.task_gates[1]["a"].parameters())
    assert all(id(p) in mixing for p in arch.task_gates[0]["a"].parameters())
    assert all(id(p) in mixing for p in arch.shared_gates.parameters())


def test_dselect_k_selects_exactly_k_experts_once_the_bits_saturate():
    module = build("dselect_k")
    arch = module.architecture
    with torch.no_grad():
        for gate in arch.gates.values():
            gate.z_logits.copy_(torch.tensor([[-5.0, 5.0], [5.0, 5.0]]))  # experts 01 and 11
    weights = arch.expert_weights()
    for w in weights.values():
        assert w.sum() == pytest.approx(1.0)
        assert set(torch.nonzero(w).flatten().tolist()) == {1, 3}
    assert arch.regularization() is None  # 4 experts, no entropy term
    odd = build("dselect_k_odd").architecture
    assert float(odd.regularization()) > 0


def test_mixture_of_experts_fine_tunes_one_task_from_a_joint_checkpoint(tmp_path):
    joint = build("mmoe")
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(joint, loader())
    path = str(tmp_path / "joint.ckpt")
    trainer.save_checkpoint(path)
    torch.manual_seed(5)
    single = MultiTaskModule(MMoE(MLP(6, (8, 8)), num_experts=3, in_features=6), [RegressionTask("a")], init_from=path)
    single.load_pretrained(path)
    for mine, theirs in zip(single.encoder.experts.parameters(), joint.encoder.experts.parameters()):
        assert torch.equal(mine, theirs)
    assert torch.equal(single.encoder.gates["a"][1].weight, joint.encoder.gates["a"][1].weight)
    fresh = MultiTaskModule(MMoE(MLP(6, (8, 8)), num_experts=3, in_features=6), [RegressionTask("z")])
    fresh.load_pretrained(path)  # no gate for z in the checkpoint: it starts fresh, experts load
    assert torch.equal(fresh.encoder.experts[0].net[0].weight, joint.encoder.experts[0].net[0].weight)


def test_fine_tuning_with_mismatched_mixing_parameters_is_reported(tmp_path):
    joint = build("cross_stitch")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(joint, loader())
    path = str(tmp_path / "joint.ckpt")
    trainer.save_checkpoint(path)
    from architecture_zoo import ARCHITECTURES as zoo
    single = MultiTaskModule(zoo["cross_stitch"](), [RegressionTask("a")])
    with pytest.raises((ValueError, KeyError), match="init_from.*(stitches|columns)"):
        single.load_pretrained(path)


def test_parameter_groups_by_role():
    module = build("mmoe", optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1),
                   parameter_groups={"shared": {"lr": 0.01}, "task": {"lr": 1.0}})
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, loader())
    groups = trainer.optimizers[0].param_groups
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[0.01] == {id(p) for p in module.shared_parameters()}
    assert by_lr[1.0] == {id(p) for t in module.task_names for p in module.task_parameters(t)}
    with pytest.raises(ValueError, match="unknown role"):
        build("mmoe", parameter_groups={"experts": {}})


def test_task_graph_adjacency_is_logged_and_drawn(tmp_path):
    module = build("task_graph")
    trainer = quiet_trainer(max_epochs=2, default_root_dir=str(tmp_path), logger=True, limit_val_batches=0)
    trainer.fit(module, loader())
    names = module.task_names
    rows = torch.tensor([[float(trainer.callback_metrics[f"arch/adjacency/{a}/{b}"]) for b in names] for a in names])
    torch.testing.assert_close(rows.sum(1), torch.ones(3))  # attention rows are distributions
    assert (tmp_path / "lightning_logs" / "version_0" / "architecture" / "adjacency_epoch1.png").exists()
    assert float(module.architecture.adjacency_count) == 0  # reset after each epoch's statistics


def _fit(module: MultiTaskModule, data: list, method, ckpt=None, **kwargs) -> torch.Tensor:
    quiet_trainer(callbacks=[method], limit_val_batches=0, **kwargs).fit(
        module, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False), ckpt_path=ckpt
    )
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def SGD(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name", ["mmoe", "mtan", "task_graph", "ple"])
def test_param_mode_accumulation_equals_the_full_batch(name):
    from gradient_helpers import interleave_halves

    batches = [batch(16, seed=s) for s in range(3)]
    full = _fit(build(name, optimizer=SGD), batches, UPGrad())
    accumulated = _fit(build(name, optimizer=SGD, accumulate_grad_batches=2), interleave_halves(batches), UPGrad())
    torch.testing.assert_close(accumulated, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mmoe", "cgc", "task_graph"])
def test_rep_mode_under_bf16_autocast_trains(name):
    module = build(name, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    before = torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])
    after = _fit(module, [batch(16, seed=s) for s in range(4)], MGDA(mode="rep"), precision="bf16-mixed")
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_architecture_with_a_stateful_method_resumes_exactly(tmp_path):
    batches = [batch(16, seed=s) for s in range(2)]
    straight = _fit(build("mmoe", optimizer=SGD), batches, PCGrad(), max_epochs=2)
    first = build("mmoe", optimizer=SGD)
    trainer = quiet_trainer(callbacks=[PCGrad()], max_epochs=1, limit_val_batches=0)
    trainer.fit(first, torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = _fit(build("mmoe", seed=7, optimizer=SGD), batches, PCGrad(), max_epochs=2, ckpt=tmp_path / "one.ckpt")
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_architecture_configs_build_through_the_cli():
    from pathlib import Path

    from mtl_lightning.cli import MTLCLI

    root = Path(__file__).resolve().parent.parent / "experiments"
    cli = MTLCLI(args=["--config", str(root / "architectures" / "mmoe.yaml")], run=False)
    assert isinstance(cli.model.architecture, MMoE) and set(cli.model.architecture.gates) == {"y1", "y2"}
    cli = MTLCLI(args=["--config", str(root / "multidigits" / "ew.yaml"), "--config",
                       str(root / "multidigits" / "soft_sharing.yaml")], run=False)
    assert isinstance(cli.model.architecture, SoftSharing) and set(cli.model.encoder.towers) == {"left", "right"}


def _every_method() -> dict:
    from gradient_helpers import METHODS

    from mtl_lightning import balancing

    loss_methods = {n: getattr(balancing, n) for n in ("EqualWeighting", "UW", "DWA", "RLW", "GLS", "SI", "IMTLL",
                                                       "STCH", "FAMO", "GradNorm")}
    return {**METHODS, **loss_methods}


@pytest.mark.parametrize("method", list(_every_method()))
@pytest.mark.parametrize("name", ["mmoe", "mtan", "task_graph"])
def test_every_balancing_method_trains_every_kind_of_architecture(name, method):
    factory = _every_method()[method]
    instance = factory()
    module = build(name, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    if getattr(instance, "mode", "param") not in module.architecture.supported_modes:
        with pytest.raises(ValueError, match="supports mode"):
            _fit(module, [batch(16, seed=s) for s in range(2)], instance)
        return
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    after = _fit(module, [batch(16, seed=s) for s in range(3)], instance)
    assert torch.isfinite(after).all()
    moved = {n for n, p in module.named_parameters() if n in before and not torch.equal(p.detach(), before[n])}
    names = {id(p): n for n, p in module.named_parameters()}
    for task in module.task_names:  # every task's own parts and head trained
        assert {names[id(p)] for p in module.task_parameters(task)} <= moved
    assert {names[id(p)] for p in module.shared_parameters()} & moved


@pytest.mark.parametrize("name,batched", [("per_task_lora", False), ("per_task_lora_frozen", False), ("mmoe", True),
                                          ("hard_sharing", True)])
def test_the_engine_loops_over_tasks_only_for_architectures_with_a_pass_per_task(name, batched, monkeypatch):
    """A vmapped backward over an architecture that runs one forward pass per task (PerTaskLoRA) would
    traverse every task's pass for every row; the gradient methods loop there, and batch elsewhere."""
    module = build(name)
    b = batch()
    ctx = context(module, b)
    method = UPGrad()
    assert method.batched_for(ctx) is batched
    calls: list[bool] = []
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    quiet_trainer(max_steps=1, callbacks=[method], limit_val_batches=0).fit(module, loader(16, 16))
    assert any(calls) is batched, calls
