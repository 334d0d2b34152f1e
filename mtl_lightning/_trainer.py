"""Typed access to the ``Trainer`` attributes that Lightning sets from its connectors at
``__init__`` (``callbacks``, ``fast_dev_run``, ``log_every_n_steps``): ``Trainer`` does not declare
them, so a type checker does not see them."""

from __future__ import annotations

from typing import Union

from lightning.pytorch import Callback, Trainer


def trainer_callbacks(trainer: Trainer) -> list[Callback]:
    """``trainer.callbacks``: the trainer's own list (appending to it adds a callback)."""
    return trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector


def fast_dev_run(trainer: Trainer) -> Union[int, bool]:
    """``trainer.fast_dev_run``: False, True, or the number of batches of a debugging run."""
    return trainer.fast_dev_run  # type: ignore[attr-defined]  # set by Lightning's trainer setup


def log_every_n_steps(trainer: Trainer) -> int:
    """``trainer.log_every_n_steps``: how often the loggers write training steps (0: never)."""
    return trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
