"""Hard parameter sharing: one encoder, read by every head (a plain ``nn.Module`` encoder means this)."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles


class HardSharing(Architecture):
    """Hard parameter sharing (Caruana 1997): one encoder whose output every head reads.

    A plain ``nn.Module`` given as ``model.encoder`` means this architecture. The encoder may return
    a dict by task (then it has no single shared representation and rep mode is unavailable).

    Examples:
        One MLP read by two regression heads (a plain ``MLP`` as ``encoder`` is the same):

        >>> import torch
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import HardSharing, check_roles
        >>> from mtl_lightning.models import MLP
        >>> _ = torch.manual_seed(0)
        >>> model = MultiTaskModule(HardSharing(MLP(4, (8,))),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # parameter tensors by role
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (2, {}, 0)
        >>> arch.supported_modes
        ('param', 'rep')
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> tuple(arch.represent(x).shape)  # z, read by every head
        (5, 8)
    """

    supported_modes = ("param", "rep")

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_features = getattr(encoder, "out_features", None)

    def parameter_roles(self) -> ParameterRoles:
        return ParameterRoles(shared=list(self.encoder.parameters()))

    def represent(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def read(self, z: Tensor, x: Tensor, task: str) -> Tensor:
        return z

    def forward(self, x: Tensor) -> Any:
        return self.encoder(x)

    def regularization(self) -> Optional[Tensor]:
        fn = getattr(self.encoder, "regularization", None)
        return fn() if callable(fn) else None
