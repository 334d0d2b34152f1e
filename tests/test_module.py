
import pytest
import torch
from torch import nn

from helpers import digits_module, quiet_trainer, small_digits
from mtl_lightning.balancing import EqualWeighting, StaticWeighting
from mtl_lightning.data import MultiTaskDataModule, TensorDictDataset
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import ClassificationTask, MultiLabelTask, RegressionTask, TaskConfigError


class MixedTypesData(MultiTaskDataModule):
    """Classification + multi-label + regression labels on the same samples, learnable from x."""

    def build_datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 8, generator=g)
        data = {
            "input": x,
            "cls": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(),
            "tags": (x[:, 2:5] > 0).float(),
            "reg": x[:, 5] * 2 + x[:, 6],
        }
        return {"train": TensorDictDataset(data), "val": TensorDictDataset(data), "test": TensorDictDataset(data)}


def mixed_module(**kwargs):
    tasks = [ClassificationTask("cls", 3), MultiLabelTask("tags", 3), RegressionTask("reg")]
    return MultiTaskModule(MLP(8, (64, 64)), tasks, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), **kwargs)


def test_classification_multilabel_regression_learn_together():
    torch.manual_seed(0)
    module, data = mixed_module(), MixedTypesData(batch_size=64)
    trainer = quiet_trainer(max_epochs=20)
    trainer.fit(module, data)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert metrics["val/cls/accuracy"] > 0.85
    assert metrics["val/tags/accuracy"] > 0.9
    assert metrics["val/reg/mse"] < 0.2  # label variance is 5


def test_task_missing_from_data_is_reported():
    module = digits_module(tasks=[ClassificationTask("left", 10), ClassificationTask("middle", 10)])
    with pytest.raises(TaskConfigError, match="Task 'middle' reads label key 'middle'.*provides \\['left', 'right'\\]"):
        quiet_trainer(max_steps=1).fit(module, small_digits())


def test_head_not_fitting_loss_is_reported():
    tasks = [ClassificationTask("left", 10), ClassificationTask("right", 10, head=nn.Linear(64, 7))]
    with pytest.raises(TaskConfigError, match="Task 'right': its head outputs shape \\(\\d+, 7\\)"):
        quiet_trainer(max_steps=1).fit(digits_module(tasks=tasks), small_digits())


def test_batch_missing_label_key_is_reported():
    class NoRight(MultiTaskDataModule):
        label_keys = None  # skip the up-front check: exercise the per-batch one

        def build_datasets(self):
            data = {"input": torch.zeros(8, 1, 12, 12), "left": torch.zeros(8, dtype=torch.long)}
            return {"train": TensorDictDataset(data), "val": TensorDictDataset(data)}

    with pytest.raises(KeyError, match="Task 'right': the batch has no label key 'right'"):
        quiet_trainer(max_steps=1, num_sanity_val_steps=0).fit(digits_module(), NoRight(batch_size=4))


def test_nan_loss_names_the_task():
    class NanRegression(RegressionTask):
        def loss(self, output, target):
            return super().loss(output, target) * float("nan")

    tasks = [ClassificationTask("left", 10), NanRegression("broken", label_key="left_x1000")]
    data = small_digits(aux_tasks=("left_x1000",))
    with pytest.raises(FloatingPointError, match="Non-finite loss for task\\(s\\) \\['broken'\\]"):
        quiet_trainer(max_steps=1, num_sanity_val_steps=0).fit(digits_module(tasks=tasks), data)


def test_two_balancing_methods_rejected():
    trainer = quiet_trainer(max_steps=1, callbacks=[EqualWeighting(), StaticWeighting({"left": 2.0})])
    with pytest.raises(ValueError, match="Only one balancing method.*EqualWeighting.*StaticWeighting"):
        trainer.fit(digits_module(), small_digits())


def test_static_weights_for_unknown_task_rejected():
    trainer = quiet_trainer(max_steps=1, callbacks=[StaticWeighting({"lefty": 2.0})])
    with pytest.raises(ValueError, match="StaticWeighting: 'weights' names unknown task\\(s\\) \\['lefty'\\]"):
        trainer.fit(digits_module(), small_digits())


def test_duplicate_task_names_rejected():
    with pytest.raises(TaskConfigError, match="repeated: \\['a'\\]"):
        MultiTaskModule(MLP(4, (8,)), [RegressionTask("a"), RegressionTask("a")])


def _one_step_grads(module, batch, callbacks=()):
    """Gradients after one training step's backward (the optimizer is a no-op: lr 0)."""
    grads = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            if closure is not None:
                closure()  # Lightning's closure runs on_before_optimizer_step (clipping)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[id(p)] = p.grad.clone()

    module.optimizer_factory = lambda params: Capture(params, lr=0.0)
    data = MultiTaskDataModule(batch_size=len(batch["input"]))
    data.build_datasets = lambda: {"train": TensorDictDataset(batch), "val": TensorDictDataset(batch)}
    quiet_trainer(max_steps=1, num_sanity_val_steps=0, callbacks=list(callbacks)).fit(module, data)
    return grads


def test_missing_labels_are_skipped_not_counted_as_zero():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    full = {"input": x, "a": torch.tensor([0, 1, 0, 1, 0, 1]), "b": torch.tensor([1.0, 2, 3, 4, 5, 6])}
    part = dict(full, a=torch.tensor([0, 1, 0, -100, -100, -100]), b=torch.tensor([1.0, 2, 3, *[float("nan")] * 3]))
    half = {k: v[:3] for k, v in full.items()}
    make = lambda: MultiTaskModule(MLP(4, (8,)), [ClassificationTask("a", 2), RegressionTask("b")])
    torch.manual_seed(1)
    m1 = make()
    torch.manual_seed(1)
    m2 = make()
    g_part = _one_step_grads(m1, part)
    g_half = _one_step_grads(m2, half)
    # Loss over the 3 labelled samples of 6 == loss over the same 3 samples alone: missing ones are not zeros.
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(g_part[id(p1)], g_half[id(p2)], atol=1e-6)


def test_static_weighting_scales_task_gradient():
    torch.manual_seed(0)
    batch = {"input": torch.randn(8, 4), "a": torch.randint(0, 2, (8,)), "b": torch.randn(8)}
    make = lambda: MultiTaskModule(MLP(4, (8,)), [ClassificationTask("a", 2), RegressionTask("b")])
    torch.manual_seed(1)
    m_ew = make()
    torch.manual_seed(1)
    m_sw = make()
    g_ew = _one_step_grads(m_ew, batch)
    g_sw = _one_step_grads(m_sw, batch, [StaticWeighting({"b": 3.0})])
    head_b_ew = [g_ew[id(p)] for p in m_ew.heads["b"].parameters()]
    head_b_sw = [g_sw[id(p)] for p in m_sw.heads["b"].parameters()]
    for ew, sw in zip(head_b_ew, head_b_sw):
        assert torch.allclose(sw, 3.0 * ew, atol=1e-6)
    for ew, sw in zip(m_ew.heads["a"].parameters(), m_sw.heads["a"].parameters()):
        assert torch.allclose(g_ew[id(ew)], g_sw[id(sw)], atol=1e-6)


def test_gradient_accumulation_matches_large_batch():
    torch.manual_seed(0)
    batch = {"input": torch.randn(8, 4), "a": torch.randint(0, 2, (8,)), "b": torch.randn(8)}
    make = lambda **kw: MultiTaskModule(MLP(4, (8,)), [ClassificationTask("a", 2), RegressionTask("b")], **kw)

    def train(module, batch_size, steps):
        module.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.1)
        data = MultiTaskDataModule(batch_size=batch_size)
        data.build_datasets = lambda: {"train": TensorDictDataset(batch), "val": TensorDictDataset(batch)}
        data.train_dataloader = lambda: data._loader("train", shuffle=False)
        quiet_trainer(max_epochs=steps, num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)
        return [p.detach().clone() for p in module.parameters()]

    torch.manual_seed(1)
    big = train(make(), 8, 3)
    torch.manual_seed(1)
    accumulated = train(make(accumulate_grad_batches=2), 4, 3)
    for a, b in zip(big, accumulated):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_clipping_applies():
    torch.manual_seed(0)
    batch = {"input": torch.randn(8, 4) * 100, "a": torch.randint(0, 2, (8,)), "b": torch.randn(8) * 100}
    module = MultiTaskModule(MLP(4, (8,)), [ClassificationTask("a", 2), RegressionTask("b")], gradient_clip_val=0.5)
    grads = _one_step_grads(module, batch)  # captured after the closure, i.e. after clipping
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)


def test_detached_task_does_not_reach_encoder():
    torch.manual_seed(0)
    batch = {"input": torch.randn(8, 4), "a": torch.randint(0, 2, (8,)), "b": torch.randn(8)}
    module = MultiTaskModule(MLP(4, (8,)), [ClassificationTask("a", 2), RegressionTask("b")])
    module.detach_task("a")
    module.set_task_loss_multiplier("b", 0.0)
    grads = _one_step_grads(module, batch)
    assert all(float(grads[id(p)].abs().sum()) == 0 for p in module.encoder.parameters())
    assert any(float(grads[id(p)].abs().sum()) > 0 for p in module.heads["a"].parameters())


@pytest.mark.slow
def test_multidigits_short_run_reaches_90_percent():
    torch.manual_seed(0)
    data = small_digits(num_train=4000, num_val=500, num_test=1000, seed=0)
    module = digits_module(optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(module, data)
    result = trainer.test(module, data, verbose=False)[0]
    assert result["test/left/accuracy"] >= 0.90
    assert result["test/right/accuracy"] >= 0.90


def test_predict_returns_probabilities_per_task():
    module = digits_module()
    out = module.predict_step({"input": torch.rand(3, 1, 12, 12)}, 0)
    assert set(out) == {"left", "right"}
    assert torch.allclose(out["left"].sum(-1), torch.ones(3))


def test_delta_logged_when_baselines_given():
    tasks = [ClassificationTask("left", 10, baselines={"accuracy": 0.5}), ClassificationTask("right", 10)]
    module = digits_module(tasks=tasks)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, small_digits())
    metrics = trainer.callback_metrics
    acc = float(metrics["val/left/accuracy"])
    assert float(metrics["val/left/delta"]) == pytest.approx((acc - 0.5) / 0.5 * 100, rel=1e-4)
    assert float(metrics["val/delta_mtl"]) == pytest.approx(float(metrics["val/left/delta"]), rel=1e-5)
    assert float(metrics["val/delta_m"]) == pytest.approx(-float(metrics["val/left/delta"]), rel=1e-5)


def test_resume_from_checkpoint_with_default_safe_loading(tmp_path):
    """Checkpoints hold no pickled objects: resuming works under torch.load(weights_only=True)."""
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(digits_module(), small_digits())
    path = str(tmp_path / "one_epoch.ckpt")
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=True)  # would raise on a pickled Task or encoder
    resumed = quiet_trainer(max_epochs=2)
    resumed.fit(digits_module(), small_digits(), ckpt_path=path)
    assert resumed.current_epoch == 2


def test_epoch_scheduler_waits_for_the_end_of_an_epoch_cut_short_by_max_steps(tmp_path):
    """Lightning calls the epoch-end hooks when max_steps stops training inside an epoch; the module
    steps its epoch-interval scheduler only at the end of an epoch that took all its batches, so a run
    resumed from that stop (which finishes the epoch) steps it as often as an uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, save=False):
        torch.manual_seed(0)
        module = digits_module(lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
        trainer = quiet_trainer(max_steps=max_steps, max_epochs=-1, limit_val_batches=0, enable_checkpointing=save,
                                callbacks=[ModelCheckpoint(dirpath=tmp_path)] if save else [])
        trainer.fit(module, small_digits(num_train=64, num_val=16, num_test=16, batch_size=32), ckpt_path=ckpt_path)  # 2 steps per epoch
        return trainer.lr_scheduler_configs[0].scheduler.last_epoch

    assert run(3, save=True) == 1  # epoch 0 ended; epoch 1 stopped after one of its two steps
    assert run(6) == run(6, ckpt_path=str(next(tmp_path.glob("*-step=3.ckpt")))) == 3
