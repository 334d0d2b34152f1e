"""Multi-gate mixture of experts: shared experts, one softmax gate per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import (
    Architecture, ParameterRoles, mix, output_width, parameters_of, replicate, softmax_gate,
)


class MMoE(Architecture):
    """Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts", KDD 2018 (doi 10.1145/3219819.3220007).

    ``num_experts`` copies of ``expert`` are shared; task t reads f_t(x) = Σ_e g_t(x)_e E_e(x) with
    its own gate g_t(x) = softmax(W_t x). With ``num_gates=1`` every task reads the same gate: the
    one-gate mixture of experts (OMoE) of the paper's comparison.

    Roles: experts shared; gates task-own (one gate: mixing). Shared representation z = the stacked
    expert outputs (batch, experts, width): param and rep modes.

    Args:
        expert: The expert network (exposes ``out_features``); copies after the first are re-initialised.
        num_experts: Number of experts.
        in_features: Width of the flattened input the gates read.
        num_gates: ``"per_task"`` gates (MMoE) or one gate for all tasks (``1``: OMoE).

    Examples:
        Three shared experts, one gate per task:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import MMoE, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(MMoE(MLP(4, (8,)), num_experts=3, in_features=4),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (6, {'a': 2, 'b': 2}, 0)
        >>> arch.supported_modes
        ('param', 'rep')
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    supported_modes = ("param", "rep")

    def __init__(self, expert: nn.Module, num_experts: int, in_features: int, num_gates: str | int = "per_task") -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"{type(self).__name__}: num_experts must be >= 1, got {num_experts}.")
        if num_gates not in ("per_task", 1):
            raise ValueError(f"{type(self).__name__}: num_gates must be 'per_task' or 1, got {num_gates!r}.")
        self.out_features = output_width(expert, "expert", type(self).__name__)
        self.experts = replicate(expert, num_experts)
        self.in_features = in_features
        self.num_gates = num_gates

    def build(self, task_names: list[str]) -> None:
        count = len(self.experts)
        if self.num_gates == 1:
            self.gate = softmax_gate(self.in_features, count)
        else:
            self.gates = nn.ModuleDict({name: softmax_gate(self.in_features, count) for name in task_names})

    def parameter_roles(self) -> ParameterRoles:
        if self.num_gates == 1:
            return ParameterRoles(shared=parameters_of(self.experts), mixing=parameters_of(self.gate))
        return ParameterRoles(shared=parameters_of(self.experts),
                              task_own={name: parameters_of(gate) for name, gate in self.gates.items()})

    def last_shared_layer(self) -> list[nn.Parameter]:
        return last_layer_of_each(self.experts)

    def represent(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        gate = self.gate if self.num_gates == 1 else self.gates[task]
        return mix(gate(x), z)


def last_layer_of_each(experts: nn.ModuleList) -> list[nn.Parameter]:
    """The parameters of each expert's last layer (the module holding its last parameter)."""
    out: list[nn.Parameter] = []
    for expert in experts:
        owner = None
        for module in expert.modules():
            if any(True for _ in module.parameters(recurse=False)):
                owner = module
        if owner is not None:
            out.extend(owner.parameters(recurse=False))
    return out
