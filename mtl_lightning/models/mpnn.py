"""The message-passing network of Gilmer et al. 2017 as Nash-MTL / FAMO run it on QM9.

Layer for layer ``Net`` of ``experiments/quantum_chemistry/models.py`` in github.com/AvivNavon/nash-mtl
(itself PyG's ``examples/qm9_nn_conv.py``): ``lin0`` (node features → dim), three rounds of an
edge-conditioned convolution (``NNConv``, mean aggregation, edge network 5 → 128 → dim²) followed by
a GRU, a ``Set2Set`` readout (3 processing steps) and ``lin1`` (2·dim → dim) with a ReLU: the shared
representation (``out_features = dim``). The per-target linear heads are the tasks' default heads
(``Linear(dim, 1)``, as their ``head_i``), built by :class:`~mtl_lightning.models.MultiTaskModule`.

The input is a ``torch_geometric`` ``Batch`` (``x``, ``edge_index``, ``edge_attr``, ``batch``), as
:class:`~mtl_lightning.data.qm9.QM9DataModule` puts it under the batch's ``"input"`` key.

``reuse_edge_weights`` (default): the edge network's output is computed once per forward and used
by the three rounds, where NNConv recomputes it in each round from the same ``edge_attr``. The
result and its gradients are the same (up to float rounding); it saves two thirds of the dominant
cost (the dim² weights of every edge). ``False`` calls ``NNConv`` itself three times.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_lightning.data.qm9 import NUM_EDGE_FEATURES, NUM_NODE_FEATURES, require_torch_geometric


class MPNN(nn.Module):
    """Gilmer et al.'s MPNN (NNConv + GRU + Set2Set), Nash-MTL's QM9 encoder.

    Args:
        num_features: Node features (11 for PyG's QM9).
        num_edge_features: Edge features (5: bond type one-hot + distance).
        dim: Hidden size and ``out_features`` (64).
        steps: Message-passing rounds (3).
        set2set_steps: Processing steps of the Set2Set readout (3).
        edge_hidden: Hidden width of the edge network (128).
        reuse_edge_weights: Compute the edge network once per forward (see the module docstring).
    """

    def __init__(
        self,
        num_features: int = NUM_NODE_FEATURES,
        num_edge_features: int = NUM_EDGE_FEATURES,
        dim: int = 64,
        steps: int = 3,
        set2set_steps: int = 3,
        edge_hidden: int = 128,
        reuse_edge_weights: bool = True,
    ) -> None:
        super().__init__()
        require_torch_geometric()
        from torch_geometric.nn import NNConv, Set2Set

        if steps < 1:
            raise ValueError(f"MPNN: steps must be >= 1, got {steps}.")
        self.dim, self.steps, self.reuse_edge_weights = dim, steps, reuse_edge_weights
        # Construction order as Net's: the RNG draws of the initialisation follow the same sequence.
        self.lin0 = nn.Linear(num_features, dim)
        edge_net = nn.Sequential(nn.Linear(num_edge_features, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))
        self.conv = NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.out_features = dim

    def _convolve(self, x: Tensor, edge_index: Tensor, weight: Tensor) -> Tensor:
        """NNConv (mean aggregation, root weight, bias) with precomputed edge weights."""
        from torch_geometric.utils import scatter

        src, dst = edge_index
        messages = torch.bmm(x[src].unsqueeze(1), weight).squeeze(1)
        out = scatter(messages, dst, dim=0, dim_size=x.shape[0], reduce="mean")
        out = out + self.conv.lin(x)
        return out + self.conv.bias if self.conv.bias is not None else out

    def forward(self, data: Any) -> Tensor:
        for key in ("x", "edge_index", "edge_attr", "batch"):
            if getattr(data, key, None) is None:
                raise TypeError(
                    f"MPNN expects a torch_geometric Batch with '{key}' (x, edge_index, edge_attr, batch), "
                    f"got {type(data).__name__}."
                )
        out = F.relu(self.lin0(data.x))
        h = out.unsqueeze(0)
        weight = self.conv.nn(data.edge_attr).view(-1, self.dim, self.dim) if self.reuse_edge_weights else None
        for _ in range(self.steps):
            if weight is not None:
                m = F.relu(self._convolve(out, data.edge_index, weight))
            else:
                m = F.relu(self.conv(out, data.edge_index, data.edge_attr))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        out = self.set2set(out, data.batch)
        return F.relu(self.lin1(out))
