"""Message passing between tasks: attention over one token per task, on top of a shared encoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, output_width, parameters_of


class TaskGraph(Architecture):
    """A task graph learned by attention: each task reads the others' features.

    The shared encoder gives z; every task t forms a token h_t = P_t z + e_t (its projection and
    embedding), and one attention layer over the T tokens (the fully connected task graph of graph
    attention, Veličković et al., ICLR 2018, in the scaled dot-product form of Vaswani et al. 2017)
    passes messages: f_t = LayerNorm(h_t + Σ_s A_ts W_v h_s), A_ts = softmax_s(⟨W_q h_t, W_k h_s⟩/√d).
    A (batch mean) is the learned adjacency: who reads whom. It is accumulated over training steps,
    logged each epoch (``arch/adjacency/<i>/<j>``) and written as a heatmap beside the logs.

    Roles: the encoder shared; projections, embeddings and the attention layer mixing (every task's
    loss reaches every token). Shared representation z = the encoder's output: param and rep modes.

    Args:
        encoder: The shared encoder (exposes ``out_features``).
        width: Token width d (default: the encoder's).
        heads: Attention heads.

    Examples:
        A shared MLP, then attention between the two task tokens:

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import TaskGraph, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(TaskGraph(MLP(4, (8,)), heads=2),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (2, {}, 11)
        >>> arch.supported_modes
        ('param', 'rep')
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> {t: tuple(f.shape) for t, f in arch(x).items()}  # features by task
        {'a': (5, 8), 'b': (5, 8)}
    """

    supported_modes = ("param", "rep")
    out_features: int
    adjacency_sum: Tensor
    adjacency_count: Tensor

    def __init__(self, encoder: nn.Module, width: int | None = None, heads: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.in_width = output_width(encoder, "encoder", "TaskGraph")
        self.out_features = width or self.in_width
        if self.out_features % heads:
            raise ValueError(f"TaskGraph: width {self.out_features} is not divisible by heads={heads}.")
        self.num_heads = heads

    def build(self, task_names: list[str]) -> None:
        d, t = self.out_features, len(task_names)
        self.projections = nn.ModuleDict({name: nn.Linear(self.in_width, d) for name in task_names})
        self.embeddings = nn.Parameter(torch.randn(t, d) / math.sqrt(d))
        self.attention = nn.MultiheadAttention(d, self.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("adjacency_sum", torch.zeros(t, t), persistent=False)
        self.register_buffer("adjacency_count", torch.zeros(()), persistent=False)

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(shared=parameters_of(self.encoder),
                              mixing=parameters_of(self.projections, self.embeddings, self.attention, self.norm))

    def represent(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def messages(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """All task features (batch, T, d) and the adjacency A (batch, T, T) from z."""
        tokens = torch.stack([proj(z) for proj in self.projections.values()], dim=1) + self.embeddings.to(z.dtype)
        passed, adjacency = self.attention(tokens, tokens, tokens, need_weights=True, average_attn_weights=True)
        return self.norm(tokens + passed), adjacency

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        features, adjacency = self.messages(z)
        index = self.task_names.index(task)
        if self.training and index == 0:
            with torch.no_grad():
                self.adjacency_sum += adjacency.float().mean(0)
                self.adjacency_count += 1
        return features[:, index]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features, _ = self.messages(self.represent(x))
        return {name: features[:, i] for i, name in enumerate(self.task_names)}

    def adjacency(self) -> Tensor:
        """A (T×T) on average over the training steps since the last :meth:`statistics`."""
        return self.adjacency_sum / self.adjacency_count.clamp_min(1)

    def statistics(self) -> dict[str, Tensor]:
        stats = {"adjacency": self.adjacency_sum.clone(), "count": self.adjacency_count.clone()}
        self.adjacency_sum.zero_()
        self.adjacency_count.zero_()
        return stats if float(stats["count"]) > 0 else {}
