"""Toy problems for looking at balancing methods through the real balancing contract.

``mtl_lightning.toy.two_objective``: the two-objective problem of CAGrad / Nash-MTL / FAMO
(``python -m mtl_lightning.toy.two_objective --help``). Submodules are not imported here, so that
``python -m`` runs them without a double import.
"""
