"""Per-task gradients: the shared Jacobian engine and the gradient balancing methods built on it."""

from mtl_lightning.gradients.engine import flatten_jacobian, task_jacobian, unflatten_into

__all__ = ["task_jacobian", "flatten_jacobian", "unflatten_into"]
