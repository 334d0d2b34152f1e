"""GradDrop: gradient sign dropout on the shared representation (Chen et al., arXiv 2010.06808)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.gradients.base import Generator, GradientBalancer


class GradDrop(GradientBalancer):
    """On the representation z: ∇_t = Σ_batch sign(z)∘∂L_t/∂z, P = ½(1 + Σ_t∇_t/Σ_t|∇_t|), U ~ Unif;
    M_t = 1[P>U]1[∇_t>0] + 1[P<U]1[∇_t<0]; the gradient sent into the encoder is
    Σ_t (leak + (1−leak)M_t) ∂L_t/∂z (masks shared over the batch, as in the official code and LibMTL).

    Rep mode only. Under DDP the batch sums are all-reduced and U is drawn from a generator seeded
    identically on every rank, so the masks equal those of one process on the union batch.

    Args:
        leak: fraction of every task gradient that always passes (0 in the paper's main runs).
        seed: seed of U (checkpointed).

    Examples:
        On the two-objective toy (rep mode on z = x, one sample), GradDrop never leaves x = 0, where
        sign(z) = 0 masks every gradient; from another start it moves:

        >>> from mtl_lightning.gradients import GradDrop
        >>> from mtl_lightning.toy.two_objective import run_method
        >>> run_method(GradDrop(seed=0), start=(0.0, 0.0), steps=20, lr=1e-2)[-1].tolist()
        [0.0, 0.0]
        >>> [round(v, 2) for v in run_method(GradDrop(seed=0), start=(-8.5, 7.5), steps=20, lr=1e-2)[-1].tolist()]
        [-8.3, 7.3]
    """

    supported_modes = ("rep",)
    uses_gramian = False

    def __init__(self, leak: float = 0.0, seed: int = 0, mode: Optional[str] = None, batched: bool = True) -> None:
        super().__init__(mode, batched)
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak}.")
        self.leak = leak
        self.generator = Generator(seed)

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        features = ctx.features
        (per_sample,) = jacobian  # (T, *z.shape): rep mode's single block
        t = per_sample.shape[0]
        signs = features.detach().sign().to(per_sample.dtype)
        product = torch.empty_like(signs)  # one task at a time: no (T, *z.shape) temporary
        signed = per_sample.new_empty((t, *signs.shape[1:]))  # (T, *feature shape)
        for row, total in zip(per_sample, signed):
            torch.sum(torch.mul(row, signs, out=product), 0, out=total)
        signed = ctx.reduce_mean(signed)  # scale-free: the mean over ranks gives the same P as the sum
        purity = 0.5 * (1 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))
        uniform = torch.rand(purity.shape, generator=self.generator.get(purity.device), device=purity.device,
                             dtype=purity.dtype)
        masks = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))
        keep = self.leak + (1 - self.leak) * masks.to(per_sample.dtype)
        direction = per_sample.mul_(keep.unsqueeze(1)).sum(0)  # the block is this step's own: in place
        return [direction], keep.reshape(t, -1).mean(1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.load(state_dict.get("generator"))
