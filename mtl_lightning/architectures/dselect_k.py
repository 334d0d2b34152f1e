"""DSelect-k: differentiable top-k selection of shared experts, one selector per task."""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, mix, output_width, parameters_of, replicate
from mtl_lightning.architectures.mmoe import last_layer_of_each

GATINGS = ("static", "per_example")


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """0 below −γ/2, 1 above γ/2, the cubic −2t³/γ³ + 3t/(2γ) + 1/2 between (C¹, exact zeros)."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate: k binary-encoded selectors, each picking one of n experts through
    ⌈log₂ n⌉ smooth-step bits, combined by softmax weights (Hazimeh et al. 2021, Eq. 5-7)."""

    codes: Tensor

    def __init__(self, num_experts: int, k: int, gamma: float, in_features: Optional[int]) -> None:
        super().__init__()
        self.num_bits = max(1, math.ceil(math.log2(num_experts)))
        self.k, self.gamma = k, gamma
        codes = [[(e >> (self.num_bits - 1 - b)) & 1 for b in range(self.num_bits)] for e in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # (n, bits)
        if in_features is None:  # static gate: the official initialisation
            self.z_logits = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-gamma / 100, gamma / 100))
            self.w_logits = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        else:
            self.z_layer = nn.Linear(in_features, k * self.num_bits)
            self.w_layer = nn.Linear(in_features, k)
            for p in self.z_layer.parameters():
                nn.init.uniform_(p, -gamma / 100, gamma / 100)
            for p in self.w_layer.parameters():
                nn.init.uniform_(p, -0.05, 0.05)

    def selectors(self, x: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(selector outputs (…, k, n), selector weights (…, k)); batch-first when per example."""
        if hasattr(self, "z_logits"):
            z, w = self.z_logits, self.w_logits
        else:
            if x is None:
                raise ValueError("DSelectKGate: a per-example gate needs the input x to select experts.")
            flat = x.flatten(1)
            z, w = self.z_layer(flat).view(-1, self.k, self.num_bits), self.w_layer(flat)
        bits = smooth_step(z, self.gamma).unsqueeze(-2)  # (…, k, 1, bits)
        outputs = torch.where(self.codes, bits, 1 - bits).prod(-1)  # (…, k, n)
        return outputs, torch.softmax(w, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        outputs, weights = self.selectors(x)
        expert_weights = (weights.unsqueeze(-1) * outputs).sum(-2)  # (…, n)
        return expert_weights.expand(x.shape[0], -1) if expert_weights.ndim == 1 else expert_weights


class DSelectK(Architecture):
    """Hazimeh et al., "DSelect-k: Differentiable Selection in the Mixture of Experts with
    Applications to Multi-Task Learning", NeurIPS 2021 (arXiv 2106.03760); official code
    google-research/dselect_k_moe.

    Like MMoE, but task t's gate selects (at most) k experts exactly, through smooth-step binary
    codes that converge to 0/1 during training: sparse, yet trained by plain gradient descent.

    ``gating="static"`` learns one selection per task (the paper's MTL setting); ``"per_example"``
    computes the selectors from the input. R(θ) (static gating only; its selectors are parameters):
    ``entropy_regularization`` × the selectors' entropy, which speeds up convergence to binary
    selections (the official default is 0), plus, when the number of experts is not a power of 2,
    the official Σ 1/Σ_e s_e penalty against codes of experts that do not exist.

    Roles: experts shared; each task's gate task-own. Shared representation z = the stacked expert
    outputs: param and rep modes.

    Args:
        expert: The expert network (exposes ``out_features``); copies after the first are re-initialised.
        num_experts: Number of experts n.
        k: Experts each task selects.
        gamma: Width γ of the smooth step.
        gating: ``"static"`` or ``"per_example"``.
        in_features: Width of the flattened input (per-example gating).
        entropy_regularization: Weight of the selectors' entropy in R(θ) (static gating).

    Examples:
        Four shared experts; each task selects two:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import DSelectK, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(DSelectK(MLP(4, (8,)), num_experts=4, k=2),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (8, {'a': 2, 'b': 2}, 0)
        >>> arch.supported_modes
        ('param', 'rep')
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    supported_modes = ("param", "rep")

    def __init__(self, expert: nn.Module, num_experts: int, k: int, gamma: float = 1.0, gating: str = "static",
                 in_features: Optional[int] = None, entropy_regularization: float = 0.0) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"DSelectK: k must be in [1, num_experts={num_experts}], got {k}.")
        if gating not in GATINGS:
            raise ValueError(f"DSelectK: gating must be one of {list(GATINGS)}, got {gating!r}.")
        power_of_two = num_experts & (num_experts - 1) == 0
        if gating == "per_example" and (in_features is None or not power_of_two):
            raise ValueError(
                "DSelectK: per-example gating needs 'in_features' and a power-of-2 num_experts (the penalty on "
                f"codes of missing experts is a parameter-only R(θ) for static gates alone); got {in_features}, {num_experts}."
            )
        if entropy_regularization < 0 or gamma <= 0:
            raise ValueError(f"DSelectK: gamma must be > 0 and entropy_regularization >= 0, got {gamma}, {entropy_regularization}.")
        self.out_features = output_width(expert, "expert", "DSelectK")
        self.experts = replicate(expert, num_experts)
        self.k, self.gamma, self.gating, self.in_features = k, gamma, gating, in_features
        self.entropy_regularization = entropy_regularization
        self.power_of_two = power_of_two

    def build(self, task_names: list[str]) -> None:
        features = self.in_features if self.gating == "per_example" else None
        self.gates = nn.ModuleDict(
            {name: DSelectKGate(len(self.experts), self.k, self.gamma, features) for name in task_names}
        )

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(shared=parameters_of(self.experts),
                              task_own={name: parameters_of(gate) for name, gate in self.gates.items()})

    def last_shared_layer(self) -> list[nn.Parameter]:
        return last_layer_of_each(self.experts)

    def represent(self, x: Tensor) -> Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        return mix(self.gates[task](x), z)

    def expert_weights(self) -> dict[str, Tensor]:
        """Each task's weights over the experts (static gating), for inspection."""
        if self.gating != "static":
            raise ValueError("DSelectK.expert_weights: per-example gates depend on the input.")
        out = {}
        for name, gate in self.gates.items():
            outputs, weights = cast(DSelectKGate, gate).selectors(None)
            out[name] = (weights.unsqueeze(-1) * outputs).sum(-2).detach()
        return out

    def regularization(self) -> Optional[Tensor]:
        if self.gating != "static" or (self.entropy_regularization == 0 and self.power_of_two):
            return None
        total = torch.zeros((), device=next(self.gates.parameters()).device)
        for gate in self.gates.values():
            outputs, _ = cast(DSelectKGate, gate).selectors(None)
            if self.entropy_regularization:
                total = total - self.entropy_regularization * (outputs * torch.log(outputs + 1e-6)).sum()
            if not self.power_of_two:
                total = total + (1.0 / outputs.sum(-1)).sum()
        return total
