"""Task balancing: Lightning callbacks that decide how the task losses become one update.

Configure exactly one under ``trainer.callbacks``; with none, :class:`EqualWeighting` is used.
"""

from mtl_lightning.balancing.base import BalancingContext, BalancingMethod, LossWeighting
from mtl_lightning.balancing.equal import EqualWeighting
from mtl_lightning.balancing.static import StaticWeighting

__all__ = ["BalancingContext", "BalancingMethod", "LossWeighting", "EqualWeighting", "StaticWeighting"]
