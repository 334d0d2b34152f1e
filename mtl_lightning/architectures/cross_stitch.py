"""Cross-stitch networks: one column per task, mixed after every stage by learned units."""

from __future__ import annotations

import copy
from typing import Optional, Sequence, cast

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles


class CrossStitch(Architecture):
    """Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016 (arXiv 1604.03539).

    Each task has its own copy (column) of every stage; after each stage the task features are
    mixed by a learned T×T unit, x̃_t = Σ_s α_ts x_s, initialised to ``self_weight`` on the diagonal
    and the rest spread evenly (the paper's (0.9, 0.1) for two tasks).

    Roles: through the units every task reaches every column, so the columns are *shared*
    (gradient methods arbitrate them); the units are *mixing* parameters. No single shared
    representation: param mode only.

    Args:
        stages: The encoder split into stages (e.g. conv blocks); features of every task have the same
            shape after each stage.
        out_features: Width of the last stage's output (for the default heads).
        self_weight: Initial diagonal of the cross-stitch units.

    Examples:
        Two stages, one column per task, a 2×2 unit after each stage:

        >>> import torch
        >>> from torch import nn
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import CrossStitch, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> stages = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
        >>> model = MultiTaskModule(CrossStitch(stages, out_features=8),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (8, {}, 2)
        >>> arch.supported_modes
        ('param',)
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    def __init__(self, stages: Sequence[nn.Module], out_features: Optional[int] = None, self_weight: float = 0.9) -> None:
        super().__init__()
        if not stages:
            raise ValueError("CrossStitch needs at least one stage.")
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"CrossStitch: self_weight must be in [0, 1], got {self_weight}.")
        self.template = [list(stages)]  # not registered: copied per task at bind time
        self.self_weight = self_weight
        self.out_features = out_features if out_features is not None else getattr(stages[-1], "out_features", None)

    def build(self, task_names: list[str]) -> None:
        stages = self.template[0]
        self.columns = nn.ModuleDict({name: nn.ModuleList(copy.deepcopy(s) for s in stages) for name in task_names})
        t = len(task_names)
        off = (1.0 - self.self_weight) / (t - 1) if t > 1 else 0.0
        init = torch.full((t, t), off) + torch.eye(t) * (self.self_weight - off)
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in stages)
        self.template = []

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(shared=list(self.columns.parameters()), mixing=list(self.stitches))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        names = self.task_names
        features = [x] * len(names)
        for depth, stitch in enumerate(self.stitches):
            outs = torch.stack([cast(nn.ModuleList, self.columns[n])[depth](f) for n, f in zip(names, features)])
            features = list(torch.einsum("ts,s...->t...", stitch.to(outs.dtype), outs).unbind(0))
        return dict(zip(names, features))
