"""What the type check (mypy, in CI) brought to light: inputs that used to fail with an unrelated
AttributeError deep inside, now handled or reported by name."""

import pytest
import torch
from torch import nn

from mtl_lightning.architectures.dselect_k import DSelectKGate
from mtl_lightning.architectures.segnet import init_segnet_weights


def test_init_segnet_weights_accepts_layers_without_bias_or_affine():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.Linear(4, 2, bias=False),
                           nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    init_segnet_weights(module)
    assert torch.count_nonzero(module[3].bias) == 0 and torch.equal(module[4].weight, torch.ones(4))


def test_per_example_dselect_gate_without_input_says_so():
    gate = DSelectKGate(num_experts=4, k=2, gamma=1.0, in_features=3)
    assert gate.selectors(torch.randn(5, 3))[0].shape == (5, 2, 4)
    with pytest.raises(ValueError, match="needs the input x"):
        gate.selectors(None)
