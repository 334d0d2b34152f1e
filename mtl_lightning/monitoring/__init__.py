"""Negative-transfer monitoring: signals, rules, actions and the report (``NegativeTransferMonitor``)."""

from mtl_lightning.monitoring.grouping import Grouping, select_networks
from mtl_lightning.monitoring.negative_transfer import ACTIONS, RULES, NegativeTransferMonitor, load_baselines
from mtl_lightning.monitoring.signals import gradient_geometry, lookahead_updates

__all__ = [
    "NegativeTransferMonitor",
    "ACTIONS",
    "RULES",
    "load_baselines",
    "select_networks",
    "Grouping",
    "gradient_geometry",
    "lookahead_updates",
]
