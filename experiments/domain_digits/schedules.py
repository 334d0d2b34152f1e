"""Example schedule for the ``Scheduled`` mixing policy, kept for configs that reference it by
``experiments.domain_digits.schedules.original_then_uniform`` (importable only with the repository
root on ``PYTHONPATH``). ``scheduled.yaml`` uses the packaged copy,
``mtl_lightning.data.schedules.original_then_uniform``, which imports from the ``mtl-lightning``
script anywhere; write your own schedule the same way, in a module on ``PYTHONPATH``."""

from __future__ import annotations

from mtl_lightning.data.schedules import original_then_uniform

__all__ = ["original_then_uniform"]
