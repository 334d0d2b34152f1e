"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023, openreview dLAYGdKTi2)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.core.engine import combine, gramian
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import all_finite, project_onto_simplex

PROJECTIONS = ("softmax", "simplex")


class MoCo(GradientBalancer):
    """Tracked per-task gradients Y and simplex weights λ updated by one step each per training step;
    the update is d = Yᵀλ.

    As LibMTL's ``MoCo`` (ported from the authors' code), at step k = 1, 2, …:

    * each task gradient is normalised to its loss: ĝ_t = g_t / (‖g_t‖ + 1e-8) · L_t;
    * tracking: y_t ← y_t − β_k (y_t − ĝ_t), β_k = β / k^σ_β, y_t = 0 at the start;
    * weights: λ ← softmax(λ − γ_k (YYᵀ + ρI) λ), γ_k = γ / k^σ_γ, λ = 1/T at the start;
    * direction: d = Σ_t λ_t y_t.

    The paper's Algorithm 1 projects onto the simplex instead of the softmax (``projection="simplex"``:
    λ ← Π_Δ(λ − γ_k (YYᵀ + ρI) λ), as the authors' Trade-Off-MOL code) and tracks the raw gradients
    (``normalize=False``). Because the gradients are normalised, the default update does not change when
    every task gradient is rescaled by a common c > 0 (``scale_exponent`` 0). The normalisation needs
    positive losses (a negative L_t turns ĝ_t into an ascent direction), as in LibMTL; shift losses that
    can be negative (the toy does, as for DB-MTL).

    **State.** Y (T × the shared parameters, float32 at least), λ and k are checkpointed. Param mode only
    (as LibMTL): tracking ∂L_t/∂z of the shared representation would average gradients of different
    samples. Under accumulation and DDP the state is updated once per optimizer step from the Jacobian
    averaged over micro-batches and ranks, so it is the same on every rank. Under fp16 loss scaling Y holds
    unscaled gradients; a step whose gradients overflowed leaves the state unchanged and writes the
    non-finite gradient, so that the optimizer skips it.

    Differences from LibMTL: none in the update (Y costs T copies of the shared parameters there too); the
    logged weights are λ, which weight the tracked y_t rather than the current gradients.

    Args:
        beta: β, the tracking rate (LibMTL 0.5).
        beta_sigma: σ_β, its decay exponent (LibMTL 0.5).
        gamma: γ, the step size of λ (LibMTL 0.1).
        gamma_sigma: σ_γ, its decay exponent (LibMTL 0.5).
        rho: ρ, the ℓ₂ regulariser of λ's subproblem (LibMTL 0).
        normalize: Normalise each gradient to its loss before tracking (LibMTL: always).
        projection: ``"softmax"`` (LibMTL) or ``"simplex"`` (the paper's Euclidean projection).

    Examples:
        Two tasks, losses 1 and 2: the first step tracks half of each loss-normalised gradient.

        >>> import torch
        >>> from mtl_lightning.gradients import MoCo
        >>> J = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=torch.float64)
        >>> method = MoCo()
        >>> (d,), w = method.aggregate([J.clone()], None, torch.tensor([1.0, 2.0]), None, None)
        >>> [round(v, 4) for v in method.y[0].flatten().tolist()]
        [0.3, 0.4, 0.0, -1.0]
        >>> [round(v, 4) for v in w.tolist()], [round(v, 4) for v in d.tolist()]
        ([0.5094, 0.4906], [0.1528, -0.2869])
    """

    supported_modes = ("param",)
    uses_gramian = False  # λ's step uses the Gramian of the tracked gradients Y, not of J

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0, normalize: bool = True, projection: str = "softmax", mode: Optional[str] = None,
                 batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not 0 < beta <= 1:
            raise ValueError(f"MoCo: beta must be in (0, 1], got {beta}.")
        if gamma <= 0:
            raise ValueError(f"MoCo: gamma must be > 0, got {gamma}.")
        if beta_sigma < 0 or gamma_sigma < 0:
            raise ValueError(f"MoCo: beta_sigma and gamma_sigma must be >= 0, got {beta_sigma}, {gamma_sigma}.")
        if rho < 0:
            raise ValueError(f"MoCo: rho must be >= 0, got {rho}.")
        if projection not in PROJECTIONS:
            raise ValueError(f"MoCo: projection must be one of {list(PROJECTIONS)}, got {projection!r}.")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.normalize = bool(normalize)
        self.projection = projection
        self.y: Optional[list[Tensor]] = None
        self.lambd: Optional[Tensor] = None
        self.steps = 0

    @property
    def scale_exponent(self) -> Optional[float]:
        # Normalised gradients: a common rescaling changes nothing; raw ones: λ's step depends on the scale.
        return 0.0 if self.normalize else None

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: Optional[BalancingContext]) -> tuple[list[Tensor], Tensor]:
        """Update Y and λ with this step's J (blocks ``(T, *shape)``, ×``scale`` under fp16) and the losses;
        return d = Yᵀλ (×``scale``, in the blocks' dtype) and λ. ``gramian`` and ``ctx`` are not used."""
        t = jacobian[0].shape[0]
        dtypes = [g.dtype for g in jacobian]
        state_dtype = torch.promote_types(dtypes[0], torch.float32)
        # ĝ_t = c_t·J_t with c_t = L_t / ‖g_t‖ (normalised) or 1, over the loss scale: folded into the
        # update of Y below, so no scaled copy of J is made.
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(t, -1), dim=1).double() for g in jacobian]).square()
        norms = norms.sum(0).sqrt()
        if scale is not None:
            norms = norms / scale.double()
            if not bool(all_finite(norms)):  # an fp16 overflow: the optimizer skips this step
                return [g.sum(0) for g in jacobian], torch.zeros(t, dtype=torch.float64, device=norms.device)
        coefficient = losses.to(norms) / (norms + 1e-8) if self.normalize else torch.ones_like(norms)
        if scale is not None:
            coefficient = coefficient / scale.double()
        y, lambd = self._state(jacobian, t, state_dtype)
        self.steps += 1
        beta = self.beta / self.steps**self.beta_sigma
        gamma = self.gamma / self.steps**self.gamma_sigma
        with torch.no_grad():
            step_size = (beta * coefficient).to(state_dtype)
            for tracked, g in zip(y, jacobian):  # y ← y − β(y − ĝ) = (1 − β)y + βĝ, in place
                tracked.mul_(1.0 - beta).addcmul_(g.to(state_dtype), step_size.view(t, *([1] * (g.dim() - 1))))
            yy = _gramian64(y)
            step = lambd - gamma * (yy @ lambd + self.rho * lambd)
            lambd = torch.softmax(step, 0) if self.projection == "softmax" else project_onto_simplex(step)
        self.lambd = lambd
        direction = combine(lambd if scale is None else lambd * scale.double(), y)
        return [d.to(dtype) for d, dtype in zip(direction, dtypes)], lambd

    def _state(self, grads: list[Tensor], num_tasks: int, dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
        """Y (zeros, in ``dtype``) and λ (uniform) at the first step; after a resume, checked against the
        gradients' shapes and moved to their device."""
        device = grads[0].device
        if self.y is None or self.lambd is None:
            self.y = [torch.zeros_like(g, dtype=dtype) for g in grads]
            self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=device)
            self.steps = 0
        shapes, held = [tuple(g.shape) for g in grads], [tuple(y.shape) for y in self.y]
        if held != shapes:
            raise ValueError(f"MoCo tracks gradients of shapes {held} (tasks first), but got {shapes} "
                             "(a checkpoint of another model or task set?).")
        if self.y[0].device != device or self.y[0].dtype != dtype:
            self.y = [y.to(device=device, dtype=dtype) for y in self.y]
        self.lambd = self.lambd.to(device=device, dtype=torch.float64)
        return self.y, self.lambd

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "y": self.y, "lambda": self.lambd, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.y = state_dict.get("y")
        self.lambd = state_dict.get("lambda")
        self.steps = int(state_dict.get("steps", 0))


def _gramian64(blocks: list[Tensor]) -> Tensor:
    """YYᵀ (T×T, float64): exact float64 products for float64 state, else the engine's float32 products
    (as the gradient methods' Gramians)."""
    if blocks[0].dtype == torch.float64:
        flat = [b.reshape(b.shape[0], -1) for b in blocks]
        return sum((f @ f.T for f in flat[1:]), flat[0] @ flat[0].T)
    return gramian(blocks).double()
