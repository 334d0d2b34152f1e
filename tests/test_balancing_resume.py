"""Stateful balancing methods resume exactly: stop after N epochs, resume from the checkpoint, and
end with the same model parameters (learnable weights included) and method state as an
uninterrupted run."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from mtl_lightning import ClassificationTask, MultiTaskModule
from mtl_lightning.balancing import DWA, FAMO, RLW, STCH, UW, GradNorm
from mtl_lightning.data import TensorDictDataset
from mtl_lightning.data.datamodule import collate_batched
from mtl_lightning.models import MLP

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]

EPOCHS, STOP_AT = 4, 2


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    data = {"input": x, "a": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "b": (x[:, 2] > 0).long()}
    # No shuffling: the global RNG is not part of a checkpoint, and the test is about the method's state.
    return torch.utils.data.DataLoader(TensorDictDataset(data), batch_size=32, shuffle=False, collate_fn=collate_batched)


def fit(method: pl.Callback, max_epochs: int, ckpt_path: str | None = None) -> tuple[pl.Trainer, MultiTaskModule]:
    pl.seed_everything(0)
    module = MultiTaskModule(MLP(6, (16,)), [ClassificationTask("a", 3), ClassificationTask("b", 2)],
                             optimizer=partial(torch.optim.Adam, lr=0.01))
    trainer = pl.Trainer(callbacks=[method], max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def flat_state(state) -> dict:
    """Nested state → {path: tensor or value} for exact comparison."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    walk("", state)
    return out


METHODS = {
    "DWA": lambda: DWA(),
    "STCH": lambda: STCH(warmup_epochs=1),
    "FAMO": lambda: FAMO(),
    "GradNorm": lambda: GradNorm(),
    "RLW": lambda: RLW(seed=1),
    "UW": lambda: UW(),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_from_checkpoint_matches_uninterrupted_run(name, tmp_path):
    _, full = fit(full_method := METHODS[name](), EPOCHS)

    first_trainer, _ = fit(METHODS[name](), STOP_AT)
    ckpt = str(tmp_path / "stop.ckpt")
    first_trainer.save_checkpoint(ckpt)
    resumed_method = METHODS[name]()
    resumed_trainer, resumed = fit(resumed_method, EPOCHS, ckpt_path=ckpt)

    assert resumed_trainer.global_step == 4 * 3
    full_params, resumed_params = full.state_dict(), resumed.state_dict()
    assert full_params.keys() == resumed_params.keys()
    for key in full_params:
        assert torch.equal(full_params[key], resumed_params[key]), key
    full_state, resumed_state = flat_state(full_method.state_dict()), flat_state(resumed_method.state_dict())
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        other = resumed_state[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    if name == "DWA":
        assert len(full_method.history.means) == EPOCHS - 1  # epochs 0-2 finished; epoch 3 used 1 and 2
    if name == "STCH":
        assert full_method.nadir is not None
