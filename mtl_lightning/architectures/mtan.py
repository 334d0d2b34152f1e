"""Multi-task attention network: one shared trunk, a soft-attention module per task and stage."""

from __future__ import annotations

from typing import Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, parameters_of


def _attention(in_width: int, width: int, spatial: bool) -> nn.Module:
    """The per-task mask a = σ(…): two 1×1 convolutions with batch norm (lorenmt/mtan), or two
    linear layers for vector features."""
    if spatial:
        return nn.Sequential(
            nn.Conv2d(in_width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.Sigmoid(),
        )
    return nn.Sequential(nn.Linear(in_width, width), nn.ReLU(), nn.Linear(width, width), nn.Sigmoid())


def _block(in_width: int, width: int, spatial: bool) -> nn.Module:
    """The shared layer f that maps an attended stage-j output to stage j+1's width (3×3 conv)."""
    if spatial:
        return nn.Sequential(nn.Conv2d(in_width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
    return nn.Sequential(nn.Linear(in_width, width), nn.ReLU())


def _resize(x: Tensor, like: Tensor) -> Tensor:
    if x.ndim < 4 or x.shape[-2:] == like.shape[-2:]:
        return x
    if x.shape[-1] > like.shape[-1]:
        return F.adaptive_max_pool2d(x, like.shape[-2:])
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class MTAN(Architecture):
    """Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv 1803.10704); official code lorenmt/mtan.

    A shared trunk of any depth (``stages``, each an ``nn.Sequential``): in stage j, u_j is the
    output of its first child and p_j the stage's output. Task t keeps an attended stream:
    a_j = g_j^t([u_j, f_{j-1}(â_{j-1})]) (g_1^t reads u_1 alone), â_j = a_j ⊙ p_j, where g_j^t is the
    task's attention module and f_j the shared layer mapping â_j to stage j+1's width (resized to
    u_{j+1}'s resolution by max-pooling). Task t's features are ``tail``(â_J) (``tail`` shared,
    e.g. flatten + linear). Spatial features (N, C, H, W) use 1×1 / 3×3 convolutions with batch
    norm, as the paper; vector features linear layers.

    Roles: trunk, f_j and ``tail`` shared; each task's attention modules task-own. Param mode only
    (every task reads the trunk at every depth).

    Args:
        stages: The shared trunk's stages.
        widths: Output channels (or features) of each stage; u_j must have the same width as p_j.
        tail: Shared module applied to each task's attended output (default: none).
        out_features: Width of the task features (default: ``tail.out_features`` or the last width).
        spatial: Stage outputs are images (N, C, H, W) rather than vectors (N, C).

    Examples:
        A two-stage trunk on vector inputs; each task attends to both stages:

        >>> import torch
        >>> from torch import nn
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import MTAN, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> stages = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
        >>> model = MultiTaskModule(MTAN(stages, [8, 8], spatial=False),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (6, {'a': 8, 'b': 8}, 0)
        >>> arch.supported_modes
        ('param',)
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    def __init__(self, stages: Sequence[nn.Sequential], widths: Sequence[int], tail: Optional[nn.Module] = None,
                 out_features: Optional[int] = None, spatial: bool = True) -> None:
        super().__init__()
        if not stages or len(stages) != len(widths):
            raise ValueError(f"MTAN: give one width per stage; got {len(stages)} stage(s) and {len(widths)} width(s).")
        for i, stage in enumerate(stages):
            if not isinstance(stage, nn.Sequential):
                raise ValueError(f"MTAN: stages[{i}] must be an nn.Sequential (u is its first child's output), got {type(stage).__name__}.")
        self.stages = nn.ModuleList(stages)
        self.widths = list(widths)
        self.spatial = spatial
        self.blocks = nn.ModuleList(_block(self.widths[j], self.widths[j + 1], spatial) for j in range(len(stages) - 1))
        self.tail = tail if tail is not None else nn.Identity()
        self.out_features = out_features or getattr(tail, "out_features", None) or (None if spatial else self.widths[-1])

    def build(self, task_names: list[str]) -> None:
        self.attention = nn.ModuleDict({
            name: nn.ModuleList(
                _attention(w if j == 0 else 2 * w, w, self.spatial) for j, w in enumerate(self.widths)
            )
            for name in task_names
        })

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(shared=parameters_of(self.stages, self.blocks, self.tail),
                              task_own={name: parameters_of(att) for name, att in self.attention.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        names = self.task_names
        attended: dict[str, Tensor] = {}
        s = x
        for j, module in enumerate(self.stages):
            stage = cast(nn.Sequential, module)  # checked in __init__
            u = stage[0](s)
            p = stage[1:](u) if len(stage) > 1 else u
            if u.shape[1] != self.widths[j] or p.shape[1] != self.widths[j]:
                raise ValueError(
                    f"MTAN: stage {j} gives u of width {u.shape[1]} and p of width {p.shape[1]}; widths[{j}] = {self.widths[j]}."
                )
            for name in names:
                source = u if j == 0 else torch.cat([u, _resize(self.blocks[j - 1](attended[name]), u)], dim=1)
                mask = _resize(cast(nn.ModuleList, self.attention[name])[j](source), p)
                attended[name] = mask * p
            s = p
        return {name: self.tail(attended[name]) for name in names}
