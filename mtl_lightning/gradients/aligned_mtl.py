"""Aligned-MTL: align the task gradients into a well-conditioned system (Senushkin et al., arXiv 2305.19000)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer


class AlignedMTL(GradientBalancer):
    """M = VΛVᵀ (eigenvalues above tol kept), B = √λ_min · VΛ^{−½}Vᵀ, α = B1, d = Σ α_t g_t.

    The aligned gradient system BJ has condition number 1 on its range. tol follows the official code:
    λ_max · T · eps of the gradients' dtype.

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import AlignedMTL
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> M = J @ J.T
        >>> w = AlignedMTL().weights(M, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [1.1056, 0.8292]
        >>> B = AlignedMTL.balance_matrix(M)  # BJ (BJ)ᵀ = λ_min I: orthogonal rows of equal norm
        >>> torch.allclose(B @ M @ B, torch.linalg.eigvalsh(M).min() * torch.eye(2, dtype=M.dtype))
        True
    """

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.balance_matrix(gramian).sum(0)

    @staticmethod
    def balance_matrix(gramian: Tensor) -> Tensor:
        """B, symmetric: the aligned task gradients are the rows of BJ."""
        eigenvalues, vectors = torch.linalg.eigh(gramian)
        tol = eigenvalues.max() * gramian.shape[0] * torch.finfo(torch.float32).eps
        keep = eigenvalues > tol
        inv_sqrt = torch.where(keep, eigenvalues.clamp_min(1e-300).rsqrt(), torch.zeros_like(eigenvalues))
        smallest = torch.where(keep, eigenvalues, torch.full_like(eigenvalues, float("inf"))).min()
        smallest = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
        return smallest.sqrt() * (vectors * inv_sqrt) @ vectors.T
