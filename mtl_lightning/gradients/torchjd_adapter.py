"""Any TorchJD weighting (``torchjd.aggregation``) as a gradient method (optional: the ``torchjd`` extra)."""

from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import torch
from torch import Tensor

from mtl_lightning.balancing.base import BalancingContext
from mtl_lightning.core.engine import combine
from mtl_lightning.gradients.base import GradientBalancer

STATS = ("gramian", "matrix")


def _aggregation_module() -> Any:
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError as error:
        raise ImportError(
            "TorchJDWeighting needs TorchJD: pip install 'mtl-lightning[torchjd]'") from error


class TorchJDWeighting(GradientBalancer):
    """The weights of a TorchJD weighting, applied by the engine: d = Σ_t w_t g_t.

    ``weighting`` is a ``torchjd.aggregation.Weighting`` instance, or the name of one of that module's
    classes (``"UPGradWeighting"``, ``"MGDAWeighting"``…; built with ``options``, for YAML). A weighting
    of the Gramian (``stat="gramian"``, most of them) gets M = JJᵀ of the unscaled gradients,
    summed over the parameter blocks (float64, as every method here); one of the Jacobian itself
    (``stat="matrix"``: ExcessMTL, SDMGrad, Krum…) gets J as one (T, P) matrix (a copy of J; unscaled
    under fp16). Everything the engine guarantees (DDP, accumulation, fp16 loss scaling, heads)
    holds as for the built-in methods. The weighting's own state (buffers of stateful TorchJD
    weightings) is checkpointed through its ``state_dict``; what it keeps in plain attributes
    (step counters) is not.

    Not in the method registry: it is a method only once given a weighting.

    Args:
        weighting: a TorchJD weighting, or the name of a class of ``torchjd.aggregation``.
        options: keyword arguments of that class (with a name only).
        stat: what the weighting takes: ``"gramian"`` or ``"matrix"``.

    Examples:
        TorchJD's UPGrad weighting gives the weights of this library's :class:`UPGrad`:

        >>> import torch
        >>> from mtl_lightning.gradients import TorchJDWeighting, UPGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = TorchJDWeighting("UPGradWeighting").weights(J @ J.T, torch.ones(2))
        >>> torch.allclose(w, UPGrad().weights(J @ J.T, torch.ones(2)), atol=1e-6)
        True
    """

    registered = False

    def __init__(self, weighting: Union[str, Any], options: Optional[dict[str, Any]] = None, stat: str = "gramian",
                 mode: Optional[str] = None, batched: bool = True,
                 engine: str = "jacobian") -> None:
        super().__init__(mode, batched, engine)
        if stat not in STATS:
            raise ValueError(f"TorchJDWeighting: stat={stat!r}; choose one of {list(STATS)}.")
        if isinstance(weighting, str):
            aggregation = _aggregation_module()
            cls = getattr(aggregation, weighting, None)
            if not isinstance(cls, type) or not issubclass(cls, aggregation.Weighting):
                raise ValueError(f"TorchJDWeighting: {weighting!r} is not a weighting of torchjd.aggregation.")
            weighting = cls(**(options or {}))
        elif options:
            raise ValueError("TorchJDWeighting: options apply to a weighting given by name only.")
        self.weighting = weighting
        self.stat = stat
        self.uses_gramian = stat == "gramian"

    @property
    def weights_from_gramian(self) -> bool:
        return self.stat == "gramian"

    @property
    def scale_exponent(self) -> Optional[float]:
        return None  # the weighting's own

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        with torch.no_grad():
            return self.weighting(gramian.double()).to(gramian.dtype)

    def aggregate(self, jacobian: list[Tensor], gramian: Optional[Tensor], losses: Tensor, scale: Optional[Tensor],
                  ctx: BalancingContext) -> tuple[list[Tensor], Tensor]:
        if self.stat == "gramian":
            return super().aggregate(jacobian, gramian, losses, scale, ctx)
        matrix = torch.cat([block.reshape(block.shape[0], -1) for block in jacobian], dim=1)
        if scale is not None:
            matrix = matrix / scale.to(matrix.dtype)
        with torch.no_grad():
            w = self.weighting(matrix)
        return combine(w, jacobian), w

    def state_dict(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict()} if hasattr(self.weighting, "state_dict") else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "weighting" in state_dict:
            self.weighting.load_state_dict(state_dict["weighting"], strict=False)
