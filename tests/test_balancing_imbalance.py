"""Loss-scale imbalance on MultiDigits: the left digit's loss is multiplied by 1000.

Setting (chosen so the run is short and the effect is large and reliable): 1024 training pairs,
batch 64, 3 epochs (48 steps), SmallCNN(8, 16 channels, 32 features), Adam lr 3e-3, seed 0.
Balanced EW reaches ≈ 0.71 right-digit accuracy; EW with the ×1000 left loss ≈ 0.11 (chance):
the shared encoder learns for the left digit only. SI, GLS and FAMO remove the scale from the first
step and keep the right digit within a few points of the balanced run.

UW and IMTL-L start from equal weights (s = 0) and must *learn* a log-scale of ≈ log 1000: within
48 steps the shared features are already lost to the left task, so they do not pass the accuracy
criterion in that short setting (they do learn the scale, checked below). With 30 epochs (480 steps)
and a learning rate of 0.5 on s they recover: right digit ≈ 0.85-0.90 vs ≈ 0.94 balanced (the
figure moves by a few points between torch builds), while EW stays at ≈ 0.35. With the model's learning rate (3e-3) on s, UW still fails at 480 steps (≈ 0.29).
"""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from mtl_lightning import ClassificationTask, MultiDigitsDataModule, MultiTaskModule
from mtl_lightning.balancing import FAMO, GLS, IMTLL, SI, UW, EqualWeighting
from mtl_lightning.models import SmallCNN

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]
SCALE = 1000.0


@pytest.fixture(scope="module")
def datamodule() -> MultiDigitsDataModule:
    dm = MultiDigitsDataModule(num_train=1024, num_val=500, num_test=10, batch_size=64, eval_batch_size=500)
    dm.setup()
    return dm


def train(datamodule, method, scale: float, epochs: int = 3) -> tuple[dict[str, float], MultiTaskModule]:
    pl.seed_everything(0)
    module = MultiTaskModule(SmallCNN(channels=(8, 16), out_features=32),
                             [ClassificationTask("left", 10), ClassificationTask("right", 10)],
                             optimizer=partial(torch.optim.Adam, lr=3e-3))
    module.set_task_loss_multiplier("left", scale)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[method], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule)
    return {t: float(trainer.callback_metrics[f"val/{t}/accuracy"]) for t in ("left", "right")}, module


@pytest.fixture(scope="module")
def balanced(datamodule) -> dict[str, float]:
    return train(datamodule, EqualWeighting(), 1.0)[0]


def test_equal_weighting_lets_the_small_loss_task_fall_behind(datamodule, balanced):
    accuracy, _ = train(datamodule, EqualWeighting(), SCALE)
    assert balanced["right"] > 0.6
    assert accuracy["right"] < balanced["right"] - 0.3


@pytest.mark.parametrize("method", [SI(), GLS(), FAMO()], ids=["SI", "GLS", "FAMO"])
def test_scale_free_methods_keep_the_small_loss_task_learning(datamodule, balanced, method):
    accuracy, _ = train(datamodule, method, SCALE)
    assert accuracy["right"] >= balanced["right"] - 0.05
    assert accuracy["left"] >= balanced["left"] - 0.1


@pytest.mark.parametrize("method", [UW(lr=0.2), IMTLL(lr=0.2)], ids=["UW", "IMTLL"])
def test_learned_weights_discount_the_scaled_task(datamodule, method):
    _, module = train(datamodule, method, SCALE)
    params = next(iter(module.balancing_parameters.values())).detach()
    # Effective weights: UW ½e^{−s}, IMTL-L e^{s}; both should fall by orders of magnitude on 'left'.
    weights = 0.5 * torch.exp(-params) if isinstance(method, UW) else torch.exp(params)
    assert float(weights[0] / weights[1]) < 0.1  # from 1 at the start


@pytest.fixture(scope="module")
def balanced_long(datamodule) -> dict[str, float]:
    return train(datamodule, EqualWeighting(), 1.0, epochs=30)[0]


def test_equal_weighting_still_behind_after_long_training(datamodule, balanced_long):
    accuracy, _ = train(datamodule, EqualWeighting(), SCALE, epochs=30)
    assert accuracy["right"] < balanced_long["right"] - 0.3


@pytest.mark.parametrize("method", [UW(lr=0.5), IMTLL(lr=0.5)], ids=["UW", "IMTLL"])
def test_learned_weights_recover_the_small_loss_task_on_longer_runs(datamodule, balanced_long, method):
    accuracy, _ = train(datamodule, method, SCALE, epochs=30)
    assert accuracy["right"] >= balanced_long["right"] - 0.1
    assert accuracy["left"] >= balanced_long["left"] - 0.12
