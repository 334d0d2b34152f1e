"""Customized gate control: shared experts plus each task's own experts, one gate per task."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import (
    Architecture, ParameterRoles, mix, output_width, parameters_of, replicate, softmax_gate,
)
from mtl_lightning.architectures.mmoe import last_layer_of_each


class CGC(Architecture):
    """Customized Gate Control, the single-level PLE of Tang et al., "Progressive Layered Extraction
    (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020
    (doi 10.1145/3383313.3412236).

    Task t reads f_t(x) = Σ_e g_t(x)_e E_e(x) over the shared experts and its own ones, with its own
    softmax gate g_t.

    Roles: shared experts shared; a task's experts and gate task-own. Shared representation
    z = the stacked shared-expert outputs (the task's experts are applied in :meth:`read`): param and
    rep modes.

    Args:
        expert: The expert network (exposes ``out_features``); every copy but the first is re-initialised.
        num_shared_experts: Experts shared by all tasks.
        num_task_experts: Experts of each task.
        in_features: Width of the flattened input the gates read.

    Examples:
        Two shared experts and one expert per task:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import CGC, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(CGC(MLP(4, (8,)), num_shared_experts=2, num_task_experts=1, in_features=4),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (4, {'a': 4, 'b': 4}, 0)
        >>> arch.supported_modes
        ('param', 'rep')
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    supported_modes = ("param", "rep")

    def __init__(self, expert: nn.Module, num_shared_experts: int, num_task_experts: int, in_features: int) -> None:
        super().__init__()
        if num_shared_experts < 1 or num_task_experts < 0:
            raise ValueError(
                f"CGC: num_shared_experts must be >= 1 and num_task_experts >= 0, got {num_shared_experts}, {num_task_experts}."
            )
        self.out_features = output_width(expert, "expert", "CGC")
        self.template = [expert]
        self.shared_experts = replicate(expert, num_shared_experts)
        self.num_task_experts = num_task_experts
        self.in_features = in_features

    def build(self, task_names: list[str]) -> None:
        count = len(self.shared_experts) + self.num_task_experts
        self.task_experts = nn.ModuleDict(
            {name: replicate(self.template[0], self.num_task_experts + 1)[1:] for name in task_names}
        )
        self.gates = nn.ModuleDict({name: softmax_gate(self.in_features, count) for name in task_names})
        self.template = []

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(
            shared=parameters_of(self.shared_experts),
            task_own={name: parameters_of(self.task_experts[name], self.gates[name]) for name in self.gates},
        )

    def last_shared_layer(self) -> list[nn.Parameter]:
        return last_layer_of_each(self.shared_experts)

    def represent(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.shared_experts], dim=1)

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        own = [expert(x) for expert in cast(nn.ModuleList, self.task_experts[task])]
        stacked = torch.cat([z, torch.stack(own, dim=1)], dim=1) if own else z
        return mix(self.gates[task](x), stacked)
