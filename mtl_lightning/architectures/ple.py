"""Progressive layered extraction: stacked CGC levels with a shared branch between levels."""

from __future__ import annotations

from typing import Sequence, cast

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import (
    Architecture, ParameterRoles, mix, output_width, parameters_of, replicate, softmax_gate,
)


class PLE(Architecture):
    """Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
    for Personalized Recommendations", RecSys 2020 (doi 10.1145/3383313.3412236), Eq. 6-7.

    Level l has shared experts, each task's experts, one gate per task and (below the last level) a
    shared gate. Task t's next input is its gate's mixture of its experts and the shared ones; the
    shared branch's next input is the shared gate's mixture of *all* experts of the level. The last
    level's task outputs are the task features.

    Roles, by gradient flow: the last level's task experts and gates, and the task gates of the level
    below, are task-own; every other task expert reaches all tasks through the shared gate and is
    shared, as are the shared experts; the shared gates and the lower task gates (whose output feeds
    the next shared gate) are mixing. Param mode only: no single shared representation.

    Args:
        experts: One expert template per level (exposing ``out_features``; level l+1's template reads
            level l's width); every copy but the first is re-initialised.
        num_shared_experts: Shared experts per level.
        num_task_experts: Experts of each task per level.
        in_features: Width of the flattened input (the first level's gates read it).

    Examples:
        Two levels of two shared experts and one expert per task:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import PLE, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(PLE([MLP(4, (8,)), MLP(8, (8,))], num_shared_experts=2, num_task_experts=1,
        ...                             in_features=4),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (12, {'a': 6, 'b': 6}, 2)
        >>> arch.supported_modes
        ('param',)
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    def __init__(self, experts: Sequence[nn.Module], num_shared_experts: int, num_task_experts: int, in_features: int) -> None:
        super().__init__()
        if not experts:
            raise ValueError("PLE needs one expert template per level (at least one level).")
        if num_shared_experts < 1 or num_task_experts < 1:
            raise ValueError(f"PLE: num_shared_experts and num_task_experts must be >= 1, got {num_shared_experts}, {num_task_experts}.")
        self.widths = [output_width(e, f"experts[{i}]", "PLE") for i, e in enumerate(experts)]
        self.out_features = self.widths[-1]
        self.template = [list(experts)]
        self.shared_experts = nn.ModuleList(replicate(e, num_shared_experts) for e in experts)
        self.num_task_experts = num_task_experts
        self.in_features = in_features

    @property
    def num_levels(self) -> int:
        return len(self.shared_experts)

    def build(self, task_names: list[str]) -> None:
        levels, shared, own = self.num_levels, len(self._shared_experts(0)), self.num_task_experts
        gate_inputs = [self.in_features, *self.widths[:-1]]
        self.task_experts = nn.ModuleList(
            nn.ModuleDict({name: replicate(e, own + 1)[1:] for name in task_names}) for e in self.template[0]
        )
        self.task_gates = nn.ModuleList(
            nn.ModuleDict({name: softmax_gate(gate_inputs[l], shared + own) for name in task_names}) for l in range(levels)
        )
        self.shared_gates = nn.ModuleList(
            softmax_gate(gate_inputs[l], shared + own * len(task_names)) for l in range(levels - 1)
        )
        self.template = []

    def _shared_experts(self, level: int) -> nn.ModuleList:
        return cast(nn.ModuleList, self.shared_experts[level])

    @staticmethod
    def _by_task(container: nn.ModuleList, level: int) -> nn.ModuleDict:
        """Level ``level`` of ``task_experts`` or ``task_gates`` (a module by task name)."""
        return cast(nn.ModuleDict, container[level])

    def parameter_roles(self) -> ParameterRoles:
        last = self.num_levels - 1
        experts, gates = self.task_experts, self.task_gates
        task_own = {
            name: parameters_of(self._by_task(experts, last)[name], self._by_task(gates, last)[name],
                                self._by_task(gates, last - 1)[name] if last > 0 else [])
            for name in self.task_names
        }
        lower_task_gates = [self._by_task(gates, l)[n] for l in range(last - 1) for n in self.task_names]
        return ParameterRoles(
            shared=parameters_of(self.shared_experts, [self.task_experts[l] for l in range(last)]),
            task_own=task_own,
            mixing=parameters_of(self.shared_gates, lower_task_gates),
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        names = self.task_names
        task_in = {name: x for name in names}
        shared_in = x
        for level in range(self.num_levels):
            task_experts, task_gates = self._by_task(self.task_experts, level), self._by_task(self.task_gates, level)
            shared_out = [expert(shared_in) for expert in self._shared_experts(level)]
            own_out = {name: [expert(task_in[name]) for expert in cast(nn.ModuleList, task_experts[name])] for name in names}
            next_in = {
                name: mix(task_gates[name](task_in[name]), torch.stack(own_out[name] + shared_out, dim=1))
                for name in names
            }
            if level < self.num_levels - 1:
                everything = torch.stack([o for name in names for o in own_out[name]] + shared_out, dim=1)
                shared_in = mix(self.shared_gates[level](shared_in), everything)
            task_in = next_in
        return task_in
