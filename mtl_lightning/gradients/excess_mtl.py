"""ExcessMTL: task weights driven by estimates of each task's excess risk (He et al., ICML 2024, arXiv 2402.02009)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.core.engine import combine
from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import all_finite, reading_is_free

#: The official guard of the AdaGrad-style diagonal Hessian, √(Σ_s g_s² + ε) (also TorchJD's), and of
#: the division by the baseline excess risk (TorchJD's; the official code has none there).
EPS = 1e-7


class ExcessMTL(GradientBalancer):
    """λ_t ← λ_t exp(η Ê_t/Ê_t⁰), renormalised to Σ_t λ_t = T; d = Σ_t λ_t g_t.

    Ê_t = g_tᵀ H_t⁻¹ g_t estimates task t's excess risk (how far it is from convergence) by a Taylor
    expansion with a diagonal Hessian approximation H_t = diag(√(Σ_{s≤k} g_{t,s}² + 1e-7)), the
    AdaGrad accumulator of the task's own gradients over the steps so far (the paper's empirical
    Fisher). Ê_t⁰, the baseline of the "scale processing" that makes tasks comparable, is the mean of
    Ê_t over the first ``warmup_steps`` steps, during which the weights stay at 1; the exponentiated
    gradient step on λ runs from the next step on. Worse-trained tasks (a large excess risk relative
    to their start) get more weight; a task with noisy labels (a large loss but a converged model)
    does not, unlike loss-driven weights.

    As the official code (``ExcessMTL`` of yifei-he/ExcessMTL, identical in LibMTL): λ starts at 1,
    sums to T (the update is the loss sum at equal weights), and with ``warmup_steps=1`` (the
    default) the first step only sets Ê⁰ = Ê_1; the default ``robust_step_size`` is the official
    command line's 1e-2 (its README runs Office-Home with 1). Differences: Ê/(Ê⁰ + 1e-7) as in
    TorchJD (the official code divides by Ê⁰ alone, NaN for a task whose first gradient is zero);
    the exponentiated step is taken in log space (softmax(log λ + ηÊ/Ê⁰)·T: the same weights, but a
    huge excess ratio saturates them instead of overflowing to NaN, as in TorchJD); the accumulator is
    kept in float32 for half-precision gradients. TorchJD's ``ExcessMTLWeighting`` (λ on the simplex,
    Σλ = 1) gives λ/T of these weights for ``n_warmup_steps = warmup_steps``, except at its default
    ``n_warmup_steps=0``, where it already takes a step on the first call with the raw Ê_1 (not
    divided by a baseline) while the official code keeps λ = 1 then. The paper (Appendix C.1)
    collects the baseline over 3 epochs: ``warmup_steps = 3 × steps per epoch``.

    Param mode only (J w.r.t. the shared parameters; the official code's representation-gradient
    variant is not reproduced). The state — λ, the T×P accumulator of squared gradients (the size of
    J), the warm-up sum, Ê⁰ and the step count — is checkpointed. J is averaged over micro-batches and
    DDP ranks before it reaches the method, so every rank updates the same state. Under fp16 loss
    scaling the gradients are unscaled first; a step with non-finite gradients (an overflow the
    optimizer skips) leaves the state unchanged (on accelerators, without a host synchronisation, it
    still counts as a step).

    Args:
        robust_step_size: η, the step size of the weights' exponentiated update (> 0; official 1e-2).
        warmup_steps: steps over which the baseline Ê⁰ is averaged, with the weights kept at 1 (≥ 1;
            official 1).

    Examples:
        Two tasks: the first one's gradient shrinks (it converges), the second one's does not; the
        weights move towards the second task.

        >>> import torch
        >>> from mtl_lightning.gradients import ExcessMTL
        >>> method = ExcessMTL(robust_step_size=1.0)
        >>> for scale in (1.0, 0.5, 0.25):
        ...     J = torch.tensor([[scale, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        ...     (d,), w = method.aggregate([J], None, torch.ones(2), None, ctx=None)  # reads no context
        ...     print([round(v, 4) for v in w.tolist()], [round(v, 4) for v in method.excess.tolist()])
        [1.0, 1.0] [1.0, 2.0]
        [0.7629, 1.2371] [0.2236, 1.4142]
        [0.5354, 1.4646] [0.0546, 1.1547]
    """

    supported_modes = ("param",)
    uses_gramian = False

    def __init__(self, robust_step_size: float = 1e-2, warmup_steps: int = 1, mode: Optional[str] = None,
                 batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not robust_step_size > 0:
            raise ValueError(f"ExcessMTL: robust_step_size must be > 0, got {robust_step_size}.")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(
                f"ExcessMTL: warmup_steps must be an integer >= 1 (the baseline excess risk is their mean), got "
                f"{warmup_steps}.")
        self.robust_step_size = float(robust_step_size)
        self.warmup_steps = int(warmup_steps)
        #: λ (T,), float64; None before the first step.
        self.task_weights: Optional[Tensor] = None
        #: Σ_s g_{t,s}² per shared-parameter block, (T, numel) each.
        self.squared_sums: Optional[list[Tensor]] = None
        self.warmup_sum: Optional[Tensor] = None
        #: Ê⁰, the mean excess risk of the warm-up steps.
        self.baseline: Optional[Tensor] = None
        #: Ê of the last step (not needed to continue: not checkpointed).
        self.excess: Optional[Tensor] = None
        self.steps = 0

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        t = jacobian[0].shape[0]
        device = jacobian[0].device
        if self.task_weights is None:
            self.task_weights = torch.ones(t, dtype=torch.float64, device=device)
        weights = self.task_weights.to(device)
        finite: Optional[Tensor] = None
        if scale is not None:  # an fp16 overflow step must not poison the state
            finite = all_finite(torch.stack([torch.linalg.vector_norm(b.reshape(t, -1), dim=1) for b in jacobian]))
            if reading_is_free(finite) and not bool(finite):
                return combine(weights, jacobian), weights
        excess = self._excess(jacobian, scale, finite)
        self.excess = excess
        self.steps += 1
        keep = None if finite is None or reading_is_free(finite) else finite
        if self.steps <= self.warmup_steps:
            self.warmup_sum = excess if self.warmup_sum is None else self.warmup_sum.to(device) + excess
            if self.steps == self.warmup_steps:
                self.baseline = self.warmup_sum / self.warmup_steps
        else:
            assert self.baseline is not None  # set at the last warm-up step
            ratio = excess / (self.baseline.to(device) + EPS)
            updated = torch.softmax(weights.log() + self.robust_step_size * ratio, dim=0) * t
            weights = updated if keep is None else torch.where(keep, updated, weights)
        self.task_weights = weights
        return combine(weights, jacobian), weights

    def _excess(self, jacobian: list[Tensor], scale: Optional[Tensor], finite: Optional[Tensor]) -> Tensor:
        """Add this step's squared gradients to the accumulator and return Ê (T,), float64."""
        t = jacobian[0].shape[0]
        if self.squared_sums is None:
            self.squared_sums = [torch.zeros(t, b[0].numel(), dtype=_state_dtype(b.dtype), device=b.device)
                                 for b in jacobian]
        elif [tuple(s.shape) for s in self.squared_sums] != [(t, b[0].numel()) for b in jacobian]:
            raise ValueError("ExcessMTL: the shared parameters or tasks changed; the accumulated squared gradients "
                             "belong to another model.")
        neutral = finite is not None and not reading_is_free(finite)  # zero a non-finite step without a sync
        excess = torch.zeros(t, dtype=torch.float64, device=jacobian[0].device)
        for i, (block, total) in enumerate(zip(jacobian, self.squared_sums)):
            if total.device != block.device:
                total = self.squared_sums[i] = total.to(block.device)
            g = block.reshape(t, -1).to(total.dtype)
            if scale is not None:
                g = g / scale.to(total.dtype)
            if neutral:
                assert finite is not None
                g = g.nan_to_num(0.0, 0.0, 0.0).mul_(finite.to(g.dtype))
            # Σ g² ← Σ g² + g², then Σ_i g_i² / √(Σ g_i² + ε), with one T×n temporary
            total.addcmul_(g, g)
            weighted = total.add(EPS).rsqrt_().mul_(g).mul_(g)
            excess += weighted.sum(1).double()  # a float64 sum would first copy the T×n block to float64
        return excess

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.task_weights, "squared_sums": self.squared_sums, "warmup_sum": self.warmup_sum,
                "baseline": self.baseline, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_weights = state_dict.get("weights")
        self.squared_sums = state_dict.get("squared_sums")
        self.warmup_sum = state_dict.get("warmup_sum")
        self.baseline = state_dict.get("baseline")
        self.steps = int(state_dict.get("steps", 0))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half-precision gradients accumulate in float32."""
    return torch.promote_types(dtype, torch.float32)
