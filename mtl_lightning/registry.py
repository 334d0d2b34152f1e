"""The method registry: every balancing method the library ships, in one place.

The list is derived, not written: a method is registered by being exported (``__all__``) from
:mod:`mtl_lightning.balancing` or :mod:`mtl_lightning.gradients` as a concrete subclass of
:class:`~mtl_lightning.balancing.BalancingMethod` (one that implements its family's contract) whose
``registered`` is true. Tests (the property suite, training, resume, DDP), the docs' method table
test, the benchmarks and the two-objective toy iterate it, so a new method joins all of them by being
exported.

Examples:
    >>> from mtl_lightning.registry import gradient_methods, loss_weighting_methods
    >>> list(gradient_methods())[:3]
    ['MGDA', 'PCGrad', 'GradVac']
    >>> "FAMO" in loss_weighting_methods() and "EW" not in loss_weighting_methods()  # aliases are not methods
    True
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from mtl_lightning.balancing.base import BalancingMethod, LossWeighting
from mtl_lightning.gradients.base import GradientBalancer

#: The packages whose ``__all__`` the registry reads, in order.
PACKAGES = ("mtl_lightning.balancing", "mtl_lightning.gradients")

M = TypeVar("M", bound=BalancingMethod)


def _is_concrete(cls: type[BalancingMethod]) -> bool:
    """Whether ``cls`` implements its family's contract (the base classes do not)."""
    if issubclass(cls, GradientBalancer):
        return cls.weights is not GradientBalancer.weights or cls.aggregate is not GradientBalancer.aggregate
    if issubclass(cls, LossWeighting):
        return cls.combine is not LossWeighting.combine
    return cls.backward is not BalancingMethod.backward


def balancing_methods() -> dict[str, type[BalancingMethod]]:
    """Every registered method, loss weighting then gradient methods, by class name, in export order."""
    found: dict[str, type[BalancingMethod]] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        for attr in module.__all__:
            obj = getattr(module, attr)
            # An alias (EW for EqualWeighting) is exported under another name: listed once, by class name.
            if (isinstance(obj, type) and issubclass(obj, BalancingMethod) and obj.__name__ == attr
                    and obj.registered and _is_concrete(obj)):
                found[attr] = obj
    return found


def _of_kind(kind: type[M]) -> dict[str, type[M]]:
    return {name: cls for name, cls in balancing_methods().items() if issubclass(cls, kind)}


def gradient_methods() -> dict[str, type[GradientBalancer]]:
    """The registered gradient methods (:mod:`mtl_lightning.gradients`), by class name."""
    return _of_kind(GradientBalancer)


def loss_weighting_methods() -> dict[str, type[BalancingMethod]]:
    """The registered methods that are not gradient methods (they need the losses only), by class name."""
    return {name: cls for name, cls in balancing_methods().items() if not issubclass(cls, GradientBalancer)}


def lookup(name: str) -> type[BalancingMethod]:
    """A registered method by name: its class name or its alias, case, ``_`` and ``-`` ignored
    (``nash_mtl``, ``NashMTL``, ``ew``)."""
    def key(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    known = {key(n): cls for n, cls in balancing_methods().items()}
    for package in PACKAGES:  # aliases (EW) resolve to their class
        module = importlib.import_module(package)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if isinstance(obj, type) and obj in known.values():
                known.setdefault(key(attr), obj)
    try:
        return known[key(name)]
    except KeyError:
        raise ValueError(f"Unknown balancing method {name!r}; registered: {sorted(balancing_methods())}.") from None
