"""Lightning callbacks that are neither a balancing method nor the monitor: evaluation protocols."""

from mtl_lightning.callbacks.first_validation_baselines import FirstValidationBaselines
from mtl_lightning.callbacks.last_epochs_average import LastEpochsAverage

__all__ = ["LastEpochsAverage", "FirstValidationBaselines"]
