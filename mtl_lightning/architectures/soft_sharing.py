"""Soft parameter sharing: one encoder per task, coupled by a regulariser on their parameters."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, replicate

PENALTIES = ("l2", "trace_norm")


class SoftSharing(Architecture):
    """One copy of ``encoder`` per task (its *tower*), kept close by λR(θ): Σ α_t L_t + λR(θ).

    * ``penalty="l2"``: R(θ) = Σ_t ‖θ_t − θ̄‖², θ̄ the mean of the towers (the ℓ2 coupling of
      Duong et al., ACL 2015). λ → ∞ recovers hard sharing, λ = 0 independent networks.
    * ``penalty="trace_norm"``: R(θ) = Σ_layers ‖W‖_*, the nuclear norm of each parameter stacked
      over tasks and flattened to a T × n matrix (Yang & Hospedales, "Trace Norm Regularised Deep
      Multi-Task Learning", ICLR workshop 2017, last-axis flattening): low rank across tasks means
      the towers share a few directions.

    No parameter is shared by all tasks (each tower is task-own): use loss-weighting methods;
    gradient methods and the negative-transfer monitor say so.

    Args:
        encoder: The tower to copy (exposes ``out_features``); copies after the first are re-initialised.
        strength: λ.
        penalty: ``"l2"`` or ``"trace_norm"``.

    Examples:
        One tower per task and no shared parameter:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import SoftSharing, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(SoftSharing(MLP(4, (8,)), strength=0.1),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (0, {'a': 2, 'b': 2}, 0)
        >>> arch.supported_modes
        ('param',)
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
        >>> float(arch.regularization()) > 0  # λR(θ): the towers start apart
        True
    """

    def __init__(self, encoder: nn.Module, strength: float = 1e-3, penalty: str = "l2") -> None:
        super().__init__()
        if strength < 0:
            raise ValueError(f"SoftSharing: strength must be >= 0, got {strength}.")
        if penalty not in PENALTIES:
            raise ValueError(f"SoftSharing: penalty must be one of {list(PENALTIES)}, got {penalty!r}.")
        self.template = [encoder]  # a list: not registered, only copied at bind time
        self.strength = strength
        self.penalty = penalty
        self.out_features = getattr(encoder, "out_features", None)

    def build(self, task_names: list[str]) -> None:
        self.towers = nn.ModuleDict(dict(zip(task_names, replicate(self.template[0], len(task_names)))))
        self.template = []

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(task_own={name: list(tower.parameters()) for name, tower in self.towers.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: tower(x) for name, tower in self.towers.items()}

    def regularization(self) -> Optional[Tensor]:
        per_tower = [list(t.parameters()) for t in self.towers.values()]
        total = torch.zeros((), device=per_tower[0][0].device)
        for same_param in zip(*per_tower):
            stacked = torch.stack(same_param).float()
            if self.penalty == "l2":
                total = total + ((stacked - stacked.mean(0)) ** 2).sum()
            else:
                total = total + torch.linalg.matrix_norm(stacked.reshape(len(same_param), -1), ord="nuc")
        return self.strength * total
