"""IMTL-G: impartial MTL, the gradient part (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning")."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer


class IMTLG(GradientBalancer):
    """Weights α (Σα = 1) making the aggregated gradient's projections on every unit task gradient equal:
    u_t = g_t/‖g_t‖, D = [g_1 − g_t]_{t≥2}, U = [u_1 − u_t]_{t≥2}, α_{2:T} = g_1Uᵀ(DUᵀ)⁻¹, α_1 = 1 − Σα_{2:T}.

    Computed from the Gramian: g_a·u_b = M_ab/‖g_b‖. Scale-dependent: sees unscaled gradients under fp16.
    Where the tasks' gradients are linearly dependent (DUᵀ singular) α_{2:T} is the minimum-norm
    solution: e.g. α = (1, 0) for two identical gradients, whose direction g_1 every solution shares.
    The pseudo-inverse is taken where the LU solve reports a singular system, on every device
    (LibMTL's ``torch.inverse`` fails there).

    Examples:
        Two conflicting task gradients, g_1 = (1, 0) and g_2 = (−1, 1): the weights come from their
        Gramian M = JJᵀ (float64, as in training).

        >>> import torch
        >>> from mtl_lightning.gradients import IMTLG
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = IMTLG().weights(J @ J.T, torch.ones(2))
        >>> [round(v, 4) for v in w.tolist()]
        [0.5858, 0.4142]
        >>> units = J / J.norm(dim=1, keepdim=True)
        >>> [round(v, 4) for v in (units @ (w @ J)).tolist()]  # equal projections on u_1 and u_2
        [0.1716, 0.1716]
    """

    promises = GradientBalancer.promises | {"task_scale_invariant_direction"}  # d·u_t equal: fixed by the units

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        t = gramian.shape[0]
        if t == 1:
            return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
        norms = gramian.diagonal().clamp_min(1e-30).sqrt()
        a = gramian / norms  # a[i, j] = g_i · u_j
        g1_u = a[0, 0] - a[0, 1:]  # g_1 · (u_1 − u_j)
        du = a[0, 0] - a[0, 1:].unsqueeze(0) - a[1:, 0].unsqueeze(1) + a[1:, 1:]
        rest, info = torch.linalg.solve_ex(du.T, g1_u)
        if bool(info.any()):
            # Linearly dependent gradients (a duplicated task, T > rank) make DUᵀ singular: any α with
            # equal projections will do; the pseudo-inverse gives the minimum-norm one. Reading `info`
            # synchronises on accelerators, but less than the pseudo-inverse would (an SVD, which
            # synchronises too), so it is taken only where needed on every device.
            rest = torch.linalg.pinv(du.T) @ g1_u
        return torch.cat([(1 - rest.sum()).unsqueeze(0), rest])
