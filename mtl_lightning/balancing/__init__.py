"""Task balancing: Lightning callbacks that decide how the task losses become one update.

Configure exactly one under ``trainer.callbacks``; with none, :class:`EqualWeighting` is used.
Loss-weighting methods (need the losses only): EW, StaticWeighting, UW, DWA, RLW, GLS, SI, IMTLL,
STCH, FAMO, GradNorm, AutoLambda (bilevel: weights learned on held-out batches).
"""

from mtl_lightning.balancing.auto_lambda import AutoLambda
from mtl_lightning.balancing.base import BalancingContext, BalancingMethod, LossWeighting
from mtl_lightning.balancing.dwa import DWA
from mtl_lightning.balancing.equal import EqualWeighting
from mtl_lightning.balancing.famo import FAMO
from mtl_lightning.balancing.gls import GLS
from mtl_lightning.balancing.gradnorm import GradNorm
from mtl_lightning.balancing.imtl_l import IMTLL
from mtl_lightning.balancing.rlw import RLW
from mtl_lightning.balancing.scale_invariant import SI
from mtl_lightning.balancing.static import StaticWeighting
from mtl_lightning.balancing.stch import STCH
from mtl_lightning.balancing.uncertainty import UW

#: Short name of equal weighting, for ``--trainer.callbacks+=mtl_lightning.balancing.EW``.
EW = EqualWeighting

__all__ = [
    "BalancingContext",
    "BalancingMethod",
    "LossWeighting",
    "EqualWeighting",
    "EW",
    "StaticWeighting",
    "UW",
    "DWA",
    "RLW",
    "GLS",
    "SI",
    "IMTLL",
    "STCH",
    "FAMO",
    "GradNorm",
    "AutoLambda",
]
