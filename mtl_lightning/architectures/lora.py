"""Per-task LoRA adapters over one pretrained backbone (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", ICLR 2022).

Each task gets its own low-rank update ΔW_t = (α/r)·B_t A_t of the chosen linear layers; the backbone
is shared (frozen by default). A task's features come from a forward pass of the backbone with only
its adapter (and the optional shared adapter) active, so T tasks cost T backbone passes.

Why not peft's multi-adapter models: peft runs one active adapter per forward pass and
``set_adapter`` turns ``requires_grad`` off on the others; its mixed-batch routing
(``adapter_names=``) is for inference only. Training T adapters in one step, with exact per-task
gradients for the gradient methods, needs every adapter trainable in the same graph, so the LoRA
layers are written here (plain ``nn.Linear`` wrappers, peft's initialisation). Adapters are saved in
peft's format (``adapter_config.json`` + ``adapter_model.safetensors``), so ``peft.PeftModel`` loads
one task's adapter onto the original model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_lightning.architectures.base import Architecture, ParameterRoles, output_width

#: Key of the shared adapter in each LoRA layer (task names may not take it).
SHARED = "_shared"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class _Route:
    """Which task's adapter the LoRA layers apply in the current forward pass (None: the shared one only)."""

    task: Optional[str] = None


class LoRALinear(nn.Module):
    """``base(x) + Σ_a (α/r)·B_a A_a dropout(x)`` over the active adapters a (the shared one, if any, and
    the routed task's). A is initialised as ``nn.Linear`` weights (Kaiming uniform), B at zero (peft's
    default), so training starts from the pretrained function."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, route: _Route) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.__dict__["_route"] = route  # not a submodule; shared by every layer of the architecture

    def add_adapter(self, name: str) -> None:
        w = self.base.weight
        a = torch.empty(self.r, self.base.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.base.out_features, self.r, device=w.device, dtype=w.dtype))

    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name``: (α/r)·B A, shaped like the base weight."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling

    @property
    def route(self) -> _Route:
        """The routing object shared by the architecture's LoRA layers (kept out of the submodules)."""
        return self.__dict__["_route"]

    def active(self) -> list[str]:
        task = self.route.task
        return [n for n in (SHARED, task) if n is not None and n in self.lora_A]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        names = self.active()
        if names:
            h = self.dropout(x)
            for name in names:
                out = out + F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scaling
        return out


class PerTaskLoRA(Architecture):
    """One LoRA adapter per task over a shared pretrained backbone, optionally a shared adapter too.

    Roles: each task's A_t, B_t task-own (only its loss reaches them); the backbone's weights and the
    shared adapter shared. Gradient methods arbitrate the shared parameters, so they need a shared
    adapter or a trainable backbone; with neither, each task trains only its own adapter and head
    (use a loss-weighting method). Param mode only: every task has its own pass through the backbone.

    Args:
        encoder: The backbone (e.g. :class:`~mtl_lightning.models.TransformerEncoder`), with an integer
            ``out_features``. LoRA is applied inside ``encoder.backbone`` when it has one (the Hugging
            Face or timm model: names and saved adapters are relative to it), else inside ``encoder``.
        r: Rank of each adapter.
        alpha: Scale α (the update is (α/r)·B A).
        target_modules: ``nn.Linear`` layers to adapt, by name or name suffix (peft's rule), e.g.
            ``["query", "value"]`` for BERT.
        shared_adapter: Add an adapter every task uses (shared), besides the per-task ones.
        train_backbone: Train the backbone's own weights too (shared); default: they stay fixed.
        dropout: Dropout on the adapters' input.

    Examples:
        Two tasks, each with a rank-2 adapter on the first layer of a small backbone:

        >>> import torch
        >>> from torch import nn
        >>> from mtl_lightning import MultiTaskModule, RegressionTask
        >>> from mtl_lightning.architectures import PerTaskLoRA, check_roles
        >>> _ = torch.manual_seed(0)
        >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> backbone.out_features = 8
        >>> model = MultiTaskModule(PerTaskLoRA(backbone, r=2, alpha=4, target_modules=["0"], shared_adapter=True),
        ...                         [RegressionTask("a"), RegressionTask("b")])
        >>> arch = model.architecture
        >>> roles = arch.parameter_roles()  # the frozen backbone's 4 tensors and the shared A, B
        >>> len(roles.shared), {t: len(p) for t, p in roles.task_own.items()}, len(roles.mixing)
        (6, {'a': 2, 'b': 2}, 0)
        >>> len(model.shared_parameters())  # trainable: the shared adapter
        2
        >>> x = torch.randn(5, 4)
        >>> _ = check_roles(model, {"input": x, "a": x[:, 0], "b": x[:, 1]})  # raises if autograd disagrees
        >>> with torch.no_grad():  # B starts at zero: make task a's adapter matter
        ...     _ = arch.adapters()[0].lora_B["a"].normal_()
        >>> merged = arch.merge("a")  # a plain backbone computing task a's features
        >>> torch.allclose(merged(x), arch(x)["a"], atol=1e-6)
        True
    """

    separate_task_passes = True  # T backbone passes, one per task

    def __init__(self, encoder: nn.Module, r: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] = ("query", "value"), shared_adapter: bool = False,
                 train_backbone: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"PerTaskLoRA: r must be >= 1, got {r}.")
        if not target_modules:
            raise ValueError("PerTaskLoRA: target_modules must name at least one nn.Linear layer.")
        self.encoder = encoder
        self.out_features = output_width(encoder, "encoder", "PerTaskLoRA")
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.target_modules = list(target_modules)
        self.shared_adapter = shared_adapter
        self.train_backbone = train_backbone
        self._route = _Route()
        self.encoder.requires_grad_(train_backbone)
        root = self.root
        targets = [name for name, m in root.named_modules()
                   if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in self.target_modules)]
        if not targets:
            linear = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"PerTaskLoRA: target_modules={self.target_modules} match no nn.Linear of "
                             f"{type(root).__name__}; its linear layers are e.g. {linear[:8]}.")
        for name in targets:
            parent, _, leaf = name.rpartition(".")
            owner = root.get_submodule(parent) if parent else root
            setattr(owner, leaf, LoRALinear(getattr(owner, leaf), self.r, self.alpha, self.dropout, self._route))
        self.adapted_modules = targets
        if shared_adapter:
            for layer in self.adapters():
                layer.add_adapter(SHARED)

    @property
    def root(self) -> nn.Module:
        """The module LoRA is applied in (``encoder.backbone`` if the encoder has one)."""
        backbone = getattr(self.encoder, "backbone", None)
        return backbone if isinstance(backbone, nn.Module) else self.encoder

    def adapters(self) -> list[LoRALinear]:
        """The LoRA layers, in module order."""
        return [m for m in self.root.modules() if isinstance(m, LoRALinear)]

    def build(self, task_names: list[str]) -> None:
        if SHARED in task_names:
            raise ValueError(f"PerTaskLoRA: a task may not be named {SHARED!r} (the shared adapter's key).")
        for layer in self.adapters():
            for name in task_names:
                layer.add_adapter(name)

    def parameter_roles(self) -> ParameterRoles:
        layers = self.adapters()
        own = {t: [p for layer in layers for p in (layer.lora_A[t], layer.lora_B[t])] for t in self.task_names}
        owned = {id(p) for ps in own.values() for p in ps}
        return ParameterRoles(shared=[p for p in self.encoder.parameters() if id(p) not in owned], task_own=own)

    def forward(self, x: Any) -> dict[str, Tensor]:
        features = {}
        try:
            for task in self.task_names:
                self._route.task = task
                features[task] = self.encoder(x)
        finally:
            self._route.task = None
        return features

    # -- deployment ------------------------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise KeyError(f"PerTaskLoRA: no adapter for task '{task}'; tasks: {self.task_names}.")

    def adapter_state(self, task: str) -> dict[str, Tensor]:
        """Task ``task``'s adapter in peft's key layout (``base_model.model.<layer>.lora_A.weight``);
        with a shared adapter, the two stacked into one of rank 2r (exact: same α/r)."""
        self._check_task(task)
        state = {}
        names = {id(m): n for n, m in self.root.named_modules()}
        for layer in self.adapters():
            parts = [SHARED, task] if self.shared_adapter else [task]
            a = torch.cat([layer.lora_A[n].detach() for n in parts], 0)
            b = torch.cat([layer.lora_B[n].detach() for n in parts], 1)
            prefix = f"base_model.model.{names[id(layer)]}"
            state[f"{prefix}.lora_A.weight"] = a.contiguous().cpu()
            state[f"{prefix}.lora_B.weight"] = b.contiguous().cpu()
        return state

    def adapter_config(self) -> dict[str, Any]:
        """peft's ``LoraConfig`` of a saved adapter."""
        factor = 2 if self.shared_adapter else 1
        return {
            "peft_type": "LORA", "r": self.r * factor, "lora_alpha": self.alpha * factor,
            "target_modules": self.target_modules, "lora_dropout": self.dropout, "bias": "none",
            "fan_in_fan_out": False, "task_type": None, "inference_mode": True, "init_lora_weights": True,
            "base_model_name_or_path": getattr(self.encoder, "path", None), "modules_to_save": None,
        }

    def save_adapter(self, task: str, folder: str) -> None:
        """Write task ``task``'s adapter to ``folder`` in peft's format (loads with ``PeftModel.from_pretrained``
        onto the original backbone, or back here with :meth:`load_adapter`)."""
        from safetensors.torch import save_file

        if self.train_backbone:
            warnings.warn("PerTaskLoRA.save_adapter: the backbone was trained too, so the adapter alone does not "
                          "reproduce the task's model; deploy merge(task) instead.", stacklevel=2)
        state = self.adapter_state(task)
        os.makedirs(folder, exist_ok=True)
        save_file(state, os.path.join(folder, ADAPTER_WEIGHTS))
        with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
            json.dump(self.adapter_config(), f, indent=2)

    def load_adapter(self, task: str, folder: str) -> None:
        """Load task ``task``'s adapter from ``folder`` (written by :meth:`save_adapter`); with a shared
        adapter, the shared part saved with it is restored too."""
        from safetensors.torch import load_file

        self._check_task(task)
        path = os.path.join(folder, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PerTaskLoRA.load_adapter: {path!r} does not exist (expected a folder written by "
                                    f"save_adapter, with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}).")
        state = load_file(path)
        expected = self.adapter_state(task)
        if set(state) != set(expected):
            raise KeyError(f"PerTaskLoRA.load_adapter: {path!r} adapts other layers than this model "
                           f"(missing {sorted(set(expected) - set(state))[:4]}, extra {sorted(set(state) - set(expected))[:4]}).")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"PerTaskLoRA.load_adapter: '{key}' in {path!r} has shape {tuple(value.shape)}, "
                                 f"this model {tuple(expected[key].shape)} (another r or shared_adapter setting?).")
        names = {id(m): n for n, m in self.root.named_modules()}
        parts = [SHARED, task] if self.shared_adapter else [task]
        with torch.no_grad():
            for layer in self.adapters():
                prefix = f"base_model.model.{names[id(layer)]}"
                a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
                for i, name in enumerate(parts):
                    layer.lora_A[name].copy_(a[i * self.r:(i + 1) * self.r])
                    layer.lora_B[name].copy_(b[:, i * self.r:(i + 1) * self.r])

    def merge(self, task: str) -> nn.Module:
        """A standalone copy of the encoder computing task ``task``'s features, with its adapter (and the
        shared one) merged into the weights: W + (α/r)·B A; plain ``nn.Linear`` layers, no LoRA code.
        For a Hugging Face encoder, ``merge(task).backbone.save_pretrained(folder)`` writes a model folder."""
        self._check_task(task)
        merged = copy.deepcopy(self.encoder)
        root = getattr(merged, "backbone", None)
        root = root if isinstance(root, nn.Module) else merged
        with torch.no_grad():
            for name, layer in [(n, m) for n, m in root.named_modules() if isinstance(m, LoRALinear)]:
                linear = layer.base
                for adapter in (SHARED, task):
                    if adapter in layer.lora_A:
                        linear.weight += layer.delta_weight(adapter).to(linear.weight.dtype)
                parent, _, leaf = name.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, leaf, linear)
        return merged.requires_grad_(False).eval()
