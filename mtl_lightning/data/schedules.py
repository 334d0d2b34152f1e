"""Schedule functions for the :class:`~mtl_lightning.data.policies.Scheduled` mixing policy.

Referenced by dotted path in YAML (``schedule: mtl_lightning.data.schedules.original_then_uniform``),
so they import wherever the package is installed (the ``mtl-lightning`` script included). A schedule
of your own must be importable the same way: in an installed package, or on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Mapping, Union


def original_then_uniform(step: int) -> Union[str, Mapping[str, float]]:
    """Train only the large ``original`` domain for 100 steps, then draw the domains uniformly."""
    if step < 100:
        return "original"
    return {"original": 1.0, "transposed": 1.0, "inverted": 1.0}
