"""Multi-task metrics: Δ_MTL against single-task baselines."""

from mtl_lightning.metrics.delta import DeltaResult, delta_mtl, relative_gain

__all__ = ["DeltaResult", "delta_mtl", "relative_gain"]
