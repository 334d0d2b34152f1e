"""Example schedule functions for the ``Scheduled`` mixing policy (referenced by dotted path in YAML,
e.g. ``schedule: experiments.domain_digits.schedules.original_then_uniform``; run from the repo root)."""

from __future__ import annotations

from typing import Mapping, Union


def original_then_uniform(step: int) -> Union[str, Mapping[str, float]]:
    """Train only the large ``original`` domain for 100 steps, then draw the domains uniformly."""
    if step < 100:
        return "original"
    return {"original": 1.0, "transposed": 1.0, "inverted": 1.0}
