import pytest
import torch

from helpers import digits_module, quiet_trainer, small_digits
from mtl_lightning.data import CorrelatedRegressionDataModule
from mtl_lightning.models import MLP, CrossStitch, MultiTaskModule, SmallCNN, SoftSharing
from mtl_lightning.tasks import ClassificationTask, RegressionTask


def test_soft_sharing_regulariser_matches_hand_computation():
    enc = SoftSharing(torch.nn.Linear(2, 1), strength=0.5)
    enc.bind(["a", "b"])
    with torch.no_grad():
        enc.towers["a"].weight.copy_(torch.tensor([[1.0, 2.0]]))
        enc.towers["a"].bias.fill_(0.0)
        enc.towers["b"].weight.copy_(torch.tensor([[3.0, 2.0]]))
        enc.towers["b"].bias.fill_(2.0)
    # mean weight (2, 2), mean bias 1: squared deviations 1+0 + 1+0 (weights) + 1 + 1 (biases) = 4
    assert float(enc.regularization()) == pytest.approx(0.5 * 4.0)
    out = enc(torch.ones(3, 2))
    assert set(out) == {"a", "b"} and out["a"].shape == (3, 1)


def test_soft_sharing_strength_pulls_towers_together():
    def tower_distance(strength):
        torch.manual_seed(0)
        enc = SoftSharing(MLP(10, (16,)), strength=strength)
        module = MultiTaskModule(
            enc, [RegressionTask("y1"), RegressionTask("y2")], optimizer=lambda p: torch.optim.Adam(p, lr=0.02)
        )
        data = CorrelatedRegressionDataModule(
            correlation=0.5, dim=10, num_train=512, num_val=128, num_test=128, batch_size=32
        )
        quiet_trainer(max_epochs=3).fit(module, data)
        return float(enc.regularization()) / max(strength, 1e-12)

    assert tower_distance(1.0) < 0.2 * tower_distance(1e-6)


def test_cross_stitch_starts_near_independent_columns_and_learns():
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU()), torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())]
    enc = CrossStitch(stages, out_features=16)
    module = MultiTaskModule(enc, [RegressionTask("y1"), RegressionTask("y2")], optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    assert torch.allclose(enc.stitches[0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    data = CorrelatedRegressionDataModule(correlation=0.9, dim=10, num_train=1024, num_val=256, num_test=256)
    before = enc.stitches[0].detach().clone()
    trainer = quiet_trainer(max_epochs=5)
    untrained = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    assert not torch.allclose(enc.stitches[0], before)  # the units receive gradients
    result = trainer.validate(module, data, verbose=False)[0]
    for task in ("y1", "y2"):
        assert result[f"val/{task}/mse"] < 0.6 * untrained[f"val/{task}/mse"]


def test_task_specific_finetuning_from_joint_checkpoint(tmp_path):
    torch.manual_seed(0)
    joint = digits_module(optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    data = small_digits(num_train=2048, batch_size=64)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(joint, data)
    joint_accuracy = trainer.validate(joint, data, verbose=False)[0]["val/left/accuracy"]
    assert joint_accuracy > 0.7
    path = str(tmp_path / "joint.ckpt")
    trainer.save_checkpoint(path)

    finetune = MultiTaskModule(SmallCNN(out_features=64), [ClassificationTask("left", 10)], init_from=path, freeze_encoder=True)
    ft_trainer = quiet_trainer(max_epochs=1)
    ft_trainer.fit(finetune, data)
    for p_joint, p_ft in zip(joint.encoder.parameters(), finetune.encoder.parameters()):
        assert torch.equal(p_joint, p_ft)  # loaded, then kept frozen
    assert not torch.equal(joint.heads["left"].weight, finetune.heads["left"].weight)  # the head trained on
    assert ft_trainer.validate(finetune, data, verbose=False)[0]["val/left/accuracy"] >= joint_accuracy - 0.03


def test_init_from_incompatible_checkpoint_is_reported(tmp_path):
    other = MultiTaskModule(MLP(144, (32,)), [ClassificationTask("left", 10)])
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(other, small_digits())
    path = str(tmp_path / "mlp.ckpt")
    trainer.save_checkpoint(path)
    module = MultiTaskModule(SmallCNN(out_features=64), [ClassificationTask("left", 10)], init_from=path)
    with pytest.raises((KeyError, RuntimeError), match="init_from|size mismatch"):
        quiet_trainer(max_steps=1).fit(module, small_digits())
