"""Methods that differentiate the shared parameters themselves refuse sharding strategies with the
alternative, before anything runs; the others are not affected.

Lightning runs FSDP and DeepSpeed only on GPUs, so these strategies are built (not launched) here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from mtl_lightning.balancing import AutoLambda, EqualWeighting, GradNorm
from mtl_lightning.balancing.base import shards_parameters
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.registry import balancing_methods
from mtl_lightning.tasks import ClassificationTask


def module() -> MultiTaskModule:
    return MultiTaskModule(MLP(4, (8,)), [ClassificationTask(name=n, num_classes=3) for n in ("a", "b")])


def test_sharding_strategies_are_recognised():
    assert shards_parameters(FSDPStrategy()) and shards_parameters(ModelParallelStrategy())
    assert not shards_parameters(DDPStrategy()) and not shards_parameters(SingleDeviceStrategy("cpu"))


@pytest.mark.parametrize("name, cls", sorted(balancing_methods().items()))
def test_methods_that_need_whole_parameters_refuse_fsdp_and_name_ddp(name, cls):
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    method = cls(weights={"a": 1.0, "b": 1.0}) if name == "StaticWeighting" else cls()
    from mtl_lightning.gradients import GradientBalancer

    expected = issubclass(cls, GradientBalancer) or cls in (GradNorm, AutoLambda)
    assert method.needs_whole_parameters == expected
    if expected:
        with pytest.raises(ValueError, match=rf"^{name} differentiates the shared parameters itself .* FSDPStrategy shards .*strategy ddp"):
            method.setup(trainer, module(), "fit")
    else:
        method.setup(trainer, module(), "fit")  # a loss weighting: one backward of Σ w_t L_t, which FSDP runs


def test_equal_weighting_is_unaffected_by_the_check_under_ddp():
    EqualWeighting().setup(SimpleNamespace(strategy=DDPStrategy()), module(), "fit")
