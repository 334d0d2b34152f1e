"""ConFIG: conflict-free gradients with equal cosines to every task (Liu et al., ICLR 2025, arXiv 2408.11104)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer


class ConFIG(GradientBalancer):
    """û = normalise(U⁺1) with U the unit task gradients (rows u_t = g_t/‖g_t‖), d = (Σ_t g_t·û) û.

    û makes the same angle with every task gradient (U û ∝ 1 where the g_t are linearly independent),
    so no task conflicts with d, whatever their scales; its length is the sum of the gradients'
    projections on it (the official ``ProjectionLength``). Computed from the Gramian: with
    D = diag(‖g_t‖) and the cosine matrix C = D⁻¹MD⁻¹ = UUᵀ, U⁺1 = Jᵀa with a = D⁻¹C⁺1, so
    d = Jᵀ(a·1ᵀMa/aᵀMa). Differences from the official code (and TorchJD's ``ConFIG``): the
    pseudo-inverse is taken on C, dropping eigenvalues below λ_max·T·ε_float32 (they take the
    pseudo-inverse or least squares of U); a zero gradient has u_t = 0, as in both. Equal preference
    weights (the official default). The M-ConFIG momentum variant is :class:`MConFIG`.

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): d bisects their directions.

        >>> import torch
        >>> from mtl_lightning.gradients import ConFIG
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> d = ConFIG().weights(J @ J.T, torch.ones(2)) @ J
        >>> units = J / J.norm(dim=1, keepdim=True)
        >>> [round(v, 4) for v in (units @ d / d.norm()).tolist()]  # equal cosines
        [0.3827, 0.3827]
        >>> round(float(d.norm()), 4)  # Σ_t g_t·û = ‖g_1‖cos + ‖g_2‖cos
        0.9239
    """

    promises = GradientBalancer.promises | {"non_conflicting", "task_scale_invariant_direction"}

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.double()
        t = gramian.shape[0]
        squares = gramian.diagonal()
        inverse_norms = squares.rsqrt().nan_to_num_(posinf=0.0).masked_fill_(squares <= 0, 0.0)  # u_t = 0 for g_t = 0
        cosines = gramian * inverse_norms * inverse_norms.unsqueeze(1)
        eigenvalues, vectors = torch.linalg.eigh(cosines)
        keep = eigenvalues > eigenvalues.max().clamp_min(0) * t * torch.finfo(torch.float32).eps
        inverse = torch.where(keep, eigenvalues.clamp_min(1e-300).reciprocal(), torch.zeros_like(eigenvalues))
        a = inverse_norms * ((vectors * inverse) @ (vectors.T @ torch.ones_like(eigenvalues)))  # D⁻¹C⁺1
        ma = gramian @ a
        squared_length = (a @ ma).clamp_min(0)  # ‖U⁺1‖²
        # d = (1ᵀJû)û with û = Jᵀa/‖Jᵀa‖: weights a·(1ᵀMa)/‖Jᵀa‖²; 0 where every gradient is 0.
        return torch.where(squared_length > 0, a * (ma.sum() / squared_length.clamp_min(1e-300)), torch.zeros_like(a))
