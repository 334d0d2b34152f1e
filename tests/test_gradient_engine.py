"""The per-task gradient engine: param / rep mode, batched vs looped, own-head-only backward."""

import pytest
import torch
from torch import nn

from mtl_lightning.gradients import combine, gramian, per_task_gradients, representation_backward, task_jacobian
from mtl_lightning.core.engine import flatten_jacobian


def _setup(num_tasks=3, seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(5, 3) for _ in range(num_tasks)])
    x = torch.randn(7, 6)
    ys = [torch.randint(3, (7,)) for _ in range(num_tasks)]
    z = encoder(x)
    losses = [nn.functional.cross_entropy(h(z), y) for h, y in zip(heads, ys)]
    return encoder, heads, z, losses


@pytest.mark.parametrize("batched", [True, False])
def test_param_mode_matches_per_loss_autograd(batched):
    encoder, heads, z, losses = _setup()
    shared = list(encoder.parameters())
    expected = flatten_jacobian(task_jacobian(losses, shared, batched=False))
    expected_heads = torch.cat([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, list(h.parameters()), retain_graph=True)])
                                for l, h in zip(losses, heads)])
    blocks, head_list = per_task_gradients(losses, z, shared, [p for h in heads for p in h.parameters()], "param", batched)
    jac, head_grads = flatten_jacobian(blocks), torch.cat([g.reshape(-1) for g in head_list])
    assert jac.shape == (3, sum(p.numel() for p in shared))
    torch.testing.assert_close(jac, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head_grads, expected_heads, rtol=1e-5, atol=1e-7)


def test_rep_mode_is_gradient_wrt_representation_and_backward_through_encoder():
    encoder, heads, z, losses = _setup()
    shared = list(encoder.parameters())
    (block,), _ = per_task_gradients(losses, z, shared, [p for h in heads for p in h.parameters()], "rep")
    jac = block.reshape(3, -1)
    expected = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].reshape(-1) for l in losses])
    torch.testing.assert_close(jac, expected)
    weights = torch.tensor([0.2, 0.5, 0.3])
    reference = torch.autograd.grad(sum(w * l for w, l in zip(weights, losses)), shared, retain_graph=True)
    flat = torch.cat([g.reshape(-1) for g in representation_backward(z, shared, weights @ jac)])
    torch.testing.assert_close(flat, torch.cat([g.reshape(-1) for g in reference]), rtol=1e-5, atol=1e-7)


def test_each_task_backward_touches_only_its_own_head():
    encoder, heads, z, losses = _setup(num_tasks=4)
    calls = [0] * 4
    for i, h in enumerate(heads):
        h.weight.register_hook(lambda g, i=i: calls.__setitem__(i, calls[i] + 1))
    per_task_gradients(losses, z, list(encoder.parameters()), [p for h in heads for p in h.parameters()], "param")
    assert calls == [1, 1, 1, 1]


def test_detached_task_contributes_zero_to_shared_jacobian():
    encoder, heads, z, _ = _setup(num_tasks=2)
    y = torch.zeros(7, dtype=torch.long)
    losses = [nn.functional.cross_entropy(heads[0](z), y), nn.functional.cross_entropy(heads[1](z.detach()), y)]
    blocks, _ = per_task_gradients(losses, z, list(encoder.parameters()), [p for h in heads for p in h.parameters()], "param")
    jac = flatten_jacobian(blocks)
    assert jac[0].abs().sum() > 0 and jac[1].abs().sum() == 0


def test_rep_mode_rejects_per_task_features():
    encoder, heads, z, losses = _setup(num_tasks=2)
    with pytest.raises(ValueError, match="Representation mode needs one shared representation"):
        per_task_gradients(losses[:2], {"a": z, "b": z}, list(encoder.parameters()), [], "rep")
    with pytest.raises(ValueError, match="mode must be 'param' or 'rep'"):
        per_task_gradients(losses, z, list(encoder.parameters()), [], "params")


def test_param_mode_with_per_task_features_falls_back_to_direct_jacobian():
    encoder, heads, z, _ = _setup(num_tasks=2)
    y = torch.zeros(7, dtype=torch.long)
    feats = {"a": z, "b": z * 2}
    losses = [nn.functional.cross_entropy(heads[0](feats["a"]), y), nn.functional.cross_entropy(heads[1](feats["b"]), y)]
    shared = list(encoder.parameters())
    expected = flatten_jacobian(task_jacobian(losses, shared, batched=False))
    blocks, _ = per_task_gradients(losses, feats, shared, [p for h in heads[:2] for p in h.parameters()], "param")
    torch.testing.assert_close(flatten_jacobian(blocks), expected, rtol=1e-5, atol=1e-7)


def _aliased_setup(detach_second: bool = False):
    """Like :func:`_setup`, but each head reads its own alias of z (as MultiTaskModule.heads_forward)."""
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(5, 3) for _ in range(3)])
    x, ys = torch.randn(7, 6), [torch.randint(3, (7,)) for _ in range(3)]
    z = encoder(x)
    aliases = [z.detach() if detach_second and i == 1 else z.view_as(z) for i in range(3)]
    losses = [nn.functional.cross_entropy(h(a), y) for h, a, y in zip(heads, aliases, ys)]
    return encoder, heads, z, aliases, losses


@pytest.mark.parametrize("mode", ["param", "rep"])
@pytest.mark.parametrize("detach_second", [False, True])
def test_one_backward_through_aliases_equals_one_backward_per_task(mode, detach_second):
    encoder, heads, z, _, losses = _aliased_setup(detach_second)  # param mode frees the graph: two copies
    shared, head_params = list(encoder.parameters()), [p for h in heads for p in h.parameters()]
    per_task_blocks, per_task_heads = per_task_gradients(losses, z, shared, head_params, mode)
    encoder, heads, z, aliases, losses = _aliased_setup(detach_second)
    shared, head_params = list(encoder.parameters()), [p for h in heads for p in h.parameters()]
    blocks, head_grads = per_task_gradients(losses, z, shared, head_params, mode, head_inputs=aliases)
    for got, want in zip([*blocks, *head_grads], [*per_task_blocks, *per_task_heads]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    if detach_second:
        assert flatten_jacobian(blocks)[1].abs().sum() == 0


def test_aliased_engine_runs_one_backward_through_the_heads():
    encoder, heads, z, aliases, losses = _aliased_setup()
    calls = [0] * 3
    for i, h in enumerate(heads):
        h.weight.register_hook(lambda g, i=i: calls.__setitem__(i, calls[i] + 1))
    per_task_gradients(losses, z, list(encoder.parameters()), [p for h in heads for p in h.parameters()], "rep",
                       head_inputs=aliases)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("tasks", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("columns", [7, 1 << 16, (1 << 16) + 37])  # short; chunked exactly; chunked + remainder
def test_gramian_and_combine_match_the_concatenated_jacobian(tasks, columns):
    torch.manual_seed(tasks)
    blocks = [torch.randn(tasks, columns), torch.randn(tasks, 3, 5), torch.randn(tasks, 11).to(torch.bfloat16)]
    flat = torch.cat([b.reshape(tasks, -1).double() for b in blocks], dim=1)
    m = gramian(blocks)
    assert m.dtype == torch.float32 and m.shape == (tasks, tasks)
    torch.testing.assert_close(m.double(), flat @ flat.T, rtol=1e-5, atol=1e-3)
    weights = torch.randn(tasks)
    out = combine(weights, blocks)
    expected = weights.double() @ flat
    assert [o.shape for o in out] == [b.shape[1:] for b in blocks]
    assert [o.dtype for o in out] == [b.dtype for b in blocks]
    got = torch.cat([o.reshape(-1).double() for o in out])
    torch.testing.assert_close(got[: -11], expected[: -11], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[-11:], expected[-11:], rtol=2e-2, atol=2e-2)  # the bf16 block



@pytest.mark.parametrize("tasks", [2, 5])
def test_gramian_groups_runs_of_short_blocks_without_changing_the_result(tasks):
    """Short blocks are multiplied in concatenated groups of up to 65,536 columns (long blocks in
    between are multiplied on their own): a block that would overflow a group starts the next."""
    torch.manual_seed(tasks)
    shapes = [(40_000,), (30_000,), (3, 5), (1 << 16,), (200, 300), (9,), (64, 3, 3, 3)]
    blocks = [torch.randn(tasks, *shape) for shape in shapes]
    flat = torch.cat([b.reshape(tasks, -1).double() for b in blocks], dim=1)
    torch.testing.assert_close(gramian(blocks).double(), flat @ flat.T, rtol=1e-5, atol=1e-2)

def test_gramian_needs_a_block():
    with pytest.raises(ValueError, match="at least one"):
        gramian([])


# -- the Gramian engine's embedding tables ----------------------------------------------------------------
class _Tokens(torch.nn.Module):
    """Two lookups of one table (one with a padding index), a position table, a linear map to T outputs;
    ``foreign`` also reads the table's weight outside its lookups."""

    def __init__(self, tasks: int, foreign: bool = False) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(40, 5, padding_idx=0)
        self.positions = torch.nn.Embedding(6, 5)
        self.out = torch.nn.Linear(5, tasks)
        self.foreign = foreign

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.words(ids) + self.positions(torch.arange(ids.shape[1])) + 0.5 * self.words(ids.flip(1))
        y = self.out(torch.tanh(h).mean(1)).pow(2).mean(0)
        return y + 0.1 * self.words.weight[:3].sum() if self.foreign else y


def _token_ids() -> torch.Tensor:
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    ids[0, :2] = 0  # padding
    return ids


def _reference_gramian(losses: torch.Tensor, params: list) -> torch.Tensor:
    return gramian(task_jacobian(list(losses), params))


@pytest.mark.parametrize("foreign", [False, True])
def test_streamed_gramian_takes_embedding_tables_from_their_lookups(foreign, monkeypatch):
    from mtl_lightning.core import engine

    torch.manual_seed(0)
    model = _Tokens(3, foreign)
    params = list(model.parameters())
    lookups = engine.EmbeddingLookups(model, params)
    assert set(lookups.tables) == {model.words, model.positions}
    model(_token_ids())  # a stale forward: its lookups are not in the graph below
    losses = model(_token_ids())
    streamed_rows: list[tuple[int, ...]] = []
    add_batched = engine._GramianAccumulator.add_batched
    monkeypatch.setattr(engine._GramianAccumulator, "add_batched",
                        lambda self, t, dim: (streamed_rows.append(tuple(t.movedim(dim, 0).shape)),
                                              add_batched(self, t, dim))[1])
    matrix, _ = engine.streamed_gramian(losses, torch.eye(3), params, lookups=lookups.take())
    torch.testing.assert_close(matrix, _reference_gramian(losses, params), rtol=1e-5, atol=1e-7)
    # A table read only through its lookups is never differentiated; one read elsewhere too is.
    assert ((3, 40, 5) in streamed_rows) == foreign
    assert (3, 6, 5) not in streamed_rows
    lookups.remove()
    assert not model.words._forward_hooks and lookups.take() == []


def test_embedding_lookups_skip_tied_and_frozen_tables():
    from mtl_lightning.core.engine import EmbeddingLookups

    model = _Tokens(2)
    model.tied = torch.nn.Linear(5, 40, bias=False)
    model.tied.weight = model.words.weight  # one parameter, two modules
    assert EmbeddingLookups(model, list(model.parameters())).tables == [model.positions]
    assert EmbeddingLookups(model, [model.out.weight]).tables == []  # not among the differentiated
