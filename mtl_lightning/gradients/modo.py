"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen, NeurIPS 2023, arXiv 2305.20057)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.gradients.base import GradientBalancer
from mtl_lightning.gradients.solvers import all_finite, project_onto_simplex


class MoDo(GradientBalancer):
    """Simplex weights λ taking one projected step per training step on an unbiased estimate of
    ½‖Jᵀλ‖² + ½ρ‖λ‖², d = Jᵀλ.

    λ ← Π_Δ(λ − γ (J₁J₂ᵀλ + ρλ)) with J₁, J₂ the task Jacobians of two independent halves of the batch,
    λ = 1/T at the start and carried over the steps (checkpointed). As in the official code
    (heshandevaka/Trade-Off-MOL) and TorchJD's ``MoDoWeighting`` the product is not symmetrised and the
    projection is the Euclidean one onto the simplex.

    **Double sampling without extra passes.** The halves are the samples of even and odd index of the
    batch (:attr:`~mtl_lightning.gradients.base.GradientBalancer.double_sampling`): the engine masks the
    rows ∂L_t/∂z of the shared representation to each half and runs one batched backward of 2T rows
    through the encoder; J₀ + J₁ = J exactly, and J₁J₂ᵀ is (2J₀)(2J₁)ᵀ, each factor the gradient of its
    half's mean loss. The update direction is J, the whole batch (the official code updates with the sum
    of its two batches' gradients, TorchJD's example with their mean: the same direction). Under
    accumulation and DDP the halves, J and A are averaged over micro-batches and ranks before λ's step, so
    the state is identical on every rank. Architectures without a shared representation (features by
    task) cannot split the batch after the forward: there J₁ = J₂ = J (a warning says so), which is also
    what :meth:`weights` computes when called with a Gramian.

    Defaults are LibMTL's (γ = 1e-3, ρ = 0.1); the official code's scripts use γ = 0.1 with ρ = 0 (toy)
    or ρ = 0.1, TorchJD γ = 0.1, ρ = 0.1. Differences from the official code and LibMTL: they draw two
    (LibMTL: three, the third for d) separate mini-batches per step, i.e. two or three forward passes;
    here one batch is split in halves. Param mode only, as both (the halves of ∂L_t/∂z would give the
    same direction for different parameters). A step whose A is not finite (an fp16 overflow, which the
    optimizer skips) leaves λ unchanged. There is no common-scale law (γ is not scale-free).

    Args:
        gamma: γ, the step size of λ (LibMTL 1e-3).
        rho: ρ, the ℓ₂ regulariser of λ's subproblem (LibMTL 0.1).

    Examples:
        With J₁ = J₂ = J (a Gramian given directly), three steps at γ = 0.1 move λ towards the task with
        the smaller gradient (MGDA's min-norm weights are (0.2, 0.8)):

        >>> import torch
        >>> from mtl_lightning.gradients import MoDo
        >>> J = torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> method = MoDo(gamma=0.1)
        >>> for _ in range(3):
        ...     w = method.weights(J @ J.T, torch.ones(2))
        ...     print([round(v, 4) for v in w.tolist()])
        [0.45, 0.55]
        [0.4255, 0.5745]
        [0.4135, 0.5865]
    """

    supported_modes = ("param",)
    double_sampling = True
    # Not promised: non-conflicting (one projected step per training step, not the min-norm point) and a
    # scale law (γ's step depends on the gradients' scale).

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1, mode: Optional[str] = None, batched: bool = True) -> None:
        super().__init__(mode, batched)
        if gamma <= 0:
            raise ValueError(f"MoDo: gamma must be > 0, got {gamma}.")
        if rho < 0:
            raise ValueError(f"MoDo: rho must be >= 0, got {rho}.")
        self.gamma = gamma
        self.rho = rho
        self.lambd: Optional[Tensor] = None

    @property
    def scale_exponent(self) -> Optional[float]:
        return None

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """One step λ ← Π_Δ(λ − γ(Aλ + ρλ)) with A = ``gramian`` (J₁J₂ᵀ in training, T×T); returns λ."""
        a = gramian.double()
        t = a.shape[0]
        start = torch.full((t,), 1.0 / t, dtype=a.dtype, device=a.device)
        lambd = start
        if self.lambd is not None and self.lambd.shape == start.shape:
            lambd = self.lambd.to(device=a.device, dtype=a.dtype)
        step = lambd - self.gamma * (a @ lambd + self.rho * lambd)
        finite = all_finite(step)  # a non-finite A (an fp16 overflow: the step is skipped) leaves λ
        self.lambd = torch.where(finite, project_onto_simplex(torch.where(finite, step, lambd)), lambd)
        return self.lambd

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lambda": self.lambd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.lambd = state_dict.get("lambda")
