"""Architectures beyond hard parameter sharing: soft sharing and information passing between tasks.

Both are encoders for :class:`~mtl_lightning.models.MultiTaskModule` that return one feature tensor
per task (a dict), so each head reads its own task's features.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn


class SoftSharing(nn.Module):
    """Soft parameter sharing: one copy of ``encoder`` per task, kept close by a regulariser.

    R(θ) = λ Σ_t ‖θ_t − θ̄‖², θ̄ the mean of the task copies (the ℓ2 coupling of Duong et al.,
    ACL 2015). The module adds ``regularization()`` to the objective, giving Σ α_t L_t + λR(θ).
    λ → ∞ recovers hard sharing, λ = 0 independent networks.

    Args:
        encoder: The per-task encoder to copy (exposes ``out_features``).
        task_names: The tasks, one copy each (must match the model's tasks).
        strength: λ.
    """

    def __init__(self, encoder: nn.Module, task_names: Sequence[str], strength: float = 1e-3) -> None:
        super().__init__()
        if not task_names:
            raise ValueError("SoftSharing needs the task names (one encoder copy per task).")
        if strength < 0:
            raise ValueError(f"SoftSharing: strength must be >= 0, got {strength}.")
        self.towers = nn.ModuleDict({name: copy.deepcopy(encoder) for name in task_names})
        for tower in list(self.towers.values())[1:]:  # independent initialisations
            for module in tower.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.strength = strength
        self.out_features = getattr(encoder, "out_features", None)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: tower(x) for name, tower in self.towers.items()}

    def regularization(self) -> Tensor:
        per_tower = [list(t.parameters()) for t in self.towers.values()]
        total = torch.zeros((), device=per_tower[0][0].device)
        for same_param in zip(*per_tower):
            stacked = torch.stack(same_param)
            total = total + ((stacked - stacked.mean(0)) ** 2).sum()
        return self.strength * total


class CrossStitch(nn.Module):
    """Cross-stitch networks (Misra et al., CVPR 2016, arXiv 1604.03539): information passing.

    Each task has its own copy of every stage; after each stage the task features are mixed by a
    learned T×T matrix, x̃_t = Σ_s α_ts x_s, initialised to ``self_weight`` on the diagonal and the
    rest spread evenly (the paper's (0.9, 0.1) for two tasks).

    Args:
        stages: The encoder split into stages (e.g. conv blocks); features of every task must have the
            same shape after each stage.
        task_names: The tasks.
        out_features: Width of the last stage's output (for the default heads).
        self_weight: Initial diagonal of the cross-stitch units.
    """

    def __init__(self, stages: Sequence[nn.Module], task_names: Sequence[str], out_features: int, self_weight: float = 0.9) -> None:
        super().__init__()
        if not stages or not task_names:
            raise ValueError("CrossStitch needs at least one stage and one task.")
        self.task_names = list(task_names)
        self.columns = nn.ModuleDict(
            {name: nn.ModuleList(copy.deepcopy(s) for s in stages) for name in self.task_names}
        )
        t = len(self.task_names)
        off = (1.0 - self_weight) / (t - 1) if t > 1 else 0.0
        init = torch.full((t, t), off) + torch.eye(t) * (self_weight - off)
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in stages)
        self.out_features = out_features

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [x] * len(self.task_names)
        for depth, stitch in enumerate(self.stitches):
            outs = torch.stack([self.columns[n][depth](f) for n, f in zip(self.task_names, features)])
            mixed = torch.einsum("ts,s...->t...", stitch, outs)
            features = list(mixed.unbind(0))
        return dict(zip(self.task_names, features))
