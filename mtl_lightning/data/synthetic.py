"""The correlated synthetic regression benchmark of MMoE (Ma et al., KDD 2018).

Two regression tasks whose correlation is set by ``p`` (the paper's Section 3.2): orthogonal unit
vectors u_1, u_2 in R^d; w_1 = c·u_1, w_2 = c(p·u_1 + √(1−p²)·u_2); x ~ N(0, I);
y_k = w_kᵀx + Σ_{i=1}^m sin(α_i w_kᵀx + β_i) + ε, ε ~ N(0, 0.01), α_i, β_i ~ N(0, 1) shared.
Shared-bottom models degrade as p falls; that is what it is for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mtl_lightning.data.datamodule import MultiTaskDataModule, TensorDictDataset


def correlated_regression(
    num_samples: int, correlation: float, dim: int, scale: float, num_sines: int, generator: torch.Generator,
    params: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Samples ``{"input", "y1", "y2"}`` and the generating parameters (reuse them across splits)."""
    if params is None:
        q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator))
        u1, u2 = q[:, 0], q[:, 1]
        w1 = scale * u1
        w2 = scale * (correlation * u1 + math.sqrt(1 - correlation**2) * u2)
        params = {
            "w": torch.stack([w1, w2]),
            "alpha": torch.randn(num_sines, generator=generator),
            "beta": torch.randn(num_sines, generator=generator),
        }
    x = torch.randn(num_samples, dim, generator=generator)
    proj = x @ params["w"].T  # (n, 2)
    sines = torch.sin(proj[..., None] * params["alpha"] + params["beta"]).sum(-1)
    y = proj + sines + 0.1 * torch.randn(num_samples, 2, generator=generator)
    return {"input": x, "y1": y[:, 0], "y2": y[:, 1]}, params


class CorrelatedRegressionDataModule(MultiTaskDataModule):
    """MMoE's synthetic two-task regression with task correlation ``correlation`` (p ∈ [−1, 1]).

    Args:
        correlation: p, the cosine between the two tasks' weight vectors.
        dim: d, input dimension. scale: c. num_sines: m.
        num_train / num_val / num_test: samples per split.
    """

    def __init__(
        self,
        correlation: float = 0.9,
        dim: int = 100,
        scale: float = 1.0,
        num_sines: int = 5,
        num_train: int = 8000,
        num_val: int = 1000,
        num_test: int = 1000,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if not -1.0 <= correlation <= 1.0:
            raise ValueError(f"CorrelatedRegressionDataModule: correlation must lie in [-1, 1], got {correlation}.")
        self.correlation, self.dim, self.scale, self.num_sines = correlation, dim, scale, num_sines
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}

    def build_datasets(self) -> dict[str, TensorDictDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        params = None
        datasets = {}
        for split, n in self.sizes.items():
            data, params = correlated_regression(n, self.correlation, self.dim, self.scale, self.num_sines, generator, params)
            datasets[split] = TensorDictDataset(data)
        return datasets
