"""One small instance of every architecture, on vector inputs, for the protocol tests."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mtl_lightning.architectures import (
    CGC, MMoE, MTAN, PLE, CrossStitch, DSelectK, HardSharing, PerTaskLoRA, SoftSharing, TaskGraph,
)
from mtl_lightning.models import MLP, MultiTaskModule
from mtl_lightning.tasks import ClassificationTask, RegressionTask

IN = 6
TASKS = ("a", "b", "c")


def _mlp(width: int = 8, hidden: int = 8, inputs: int = IN) -> MLP:
    return MLP(inputs, (hidden, width))


def _stage(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Linear(i, o), nn.ReLU()), nn.Sequential(nn.Linear(o, o), nn.ReLU()))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "plain": lambda: _mlp(),
    "hard_sharing": lambda: HardSharing(_mlp()),
    "soft_sharing": lambda: SoftSharing(_mlp(), strength=0.1),
    "soft_sharing_trace": lambda: SoftSharing(_mlp(), strength=0.1, penalty="trace_norm"),
    "cross_stitch": lambda: CrossStitch([_stage(IN, 8), _stage(8, 8)], out_features=8),
    "mtan": lambda: MTAN([_stage(IN, 8), _stage(8, 8), _stage(8, 8)], [8, 8, 8], spatial=False),
    "mmoe": lambda: MMoE(_mlp(), num_experts=3, in_features=IN),
    "omoe": lambda: MMoE(_mlp(), num_experts=3, in_features=IN, num_gates=1),
    "cgc": lambda: CGC(_mlp(), num_shared_experts=2, num_task_experts=1, in_features=IN),
    "ple": lambda: PLE([_mlp(), _mlp(inputs=8), _mlp(inputs=8)], num_shared_experts=2, num_task_experts=1, in_features=IN),
    "dselect_k": lambda: DSelectK(_mlp(), num_experts=4, k=2),
    "dselect_k_per_example": lambda: DSelectK(_mlp(), num_experts=4, k=2, gating="per_example", in_features=IN),
    "dselect_k_odd": lambda: DSelectK(_mlp(), num_experts=3, k=2, entropy_regularization=1e-3),
    "task_graph": lambda: TaskGraph(_mlp(), heads=2),
    # one LoRA adapter per task on both layers, a shared adapter and the (here trainable) backbone shared
    "per_task_lora": lambda: PerTaskLoRA(_mlp(), r=2, alpha=4, target_modules=["net.0", "net.2"], shared_adapter=True,
                                         train_backbone=True),
    # as on a pretrained model: the backbone frozen, gradient methods arbitrate the shared adapter
    "per_task_lora_frozen": lambda: PerTaskLoRA(_mlp(), r=2, alpha=4, target_modules=["net.0", "net.2"],
                                                shared_adapter=True),
}
#: Architectures without a parameter shared by all tasks.
NO_SHARED = {"soft_sharing", "soft_sharing_trace"}


def tasks() -> list:
    return [RegressionTask("a"), ClassificationTask("b", 3), RegressionTask("c")]


def build(name: str, seed: int = 0, **kwargs) -> MultiTaskModule:
    torch.manual_seed(seed)
    return MultiTaskModule(ARCHITECTURES[name](), tasks(), **kwargs)


def batch(size: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, IN, generator=g)
    return {"input": x, "a": x[:, 0] + 0.1 * torch.randn(size, generator=g), "b": (x[:, 1] > 0).long() + (x[:, 2] > 1).long(),
            "c": x[:, 0] * x[:, 3]}
