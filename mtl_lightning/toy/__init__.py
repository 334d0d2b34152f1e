"""Toy problems for looking at balancing methods through the real balancing contract."""

from mtl_lightning.toy.two_objective import (
    PAPER_STARTS,
    TwoObjectiveModule,
    run_method,
    two_objective_losses,
)

__all__ = ["TwoObjectiveModule", "two_objective_losses", "run_method", "PAPER_STARTS"]
