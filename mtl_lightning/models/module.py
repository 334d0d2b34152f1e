"""The multi-task LightningModule: one shared encoder, one head per task.

The module computes per-task losses and metrics; *how* the losses become an update is decided by
the balancing callback (``mtl_lightning.balancing``). The module therefore drives optimization
itself (Lightning's manual optimization) and honours the Trainer's ``gradient_clip_val``,
``gradient_clip_algorithm`` and ``accumulate_grad_batches`` (the CLI hands them over to it; in
Python pass them to the module), AMP loss scaling, DDP and LR schedulers.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, cast

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mtl_lightning._trainer import fast_dev_run, log_every_n_steps, trainer_callbacks
from mtl_lightning.architectures.base import Architecture, ParameterRoles
from mtl_lightning.architectures.hard_sharing import HardSharing
from mtl_lightning.balancing.base import BalancingMethod
from mtl_lightning.balancing.equal import EqualWeighting
from mtl_lightning.core.context import TrainingLosses
from mtl_lightning.core.step import MultiTaskStep
from mtl_lightning.data.datamodule import dataset_labels
from mtl_lightning.fault_tolerance import read_checkpoint
from mtl_lightning.metrics.delta import delta_mtl
from mtl_lightning.models.backend import LightningBackend
from mtl_lightning.tasks.task import Task, TaskConfigError

_BALANCING_PREFIX = "balancing_parameters."
_PARAMETER_GROUPS = ("shared", "task", "mixing")
#: Phrases of torch's errors when a module receives an input of the wrong size.
_SHAPE_ERROR = re.compile(r"shape|size mismatch|channels|dimension|Expected .*size", re.IGNORECASE)


def input_batch_size(x: Any) -> int:
    """The number of samples in a model input: a tensor's first dimension, or that of the first
    tensor in a dict input (``{"input_ids": …, "attention_mask": …}``)."""
    if isinstance(x, Mapping):
        for value in x.values():
            if isinstance(value, Tensor):
                return len(value)
        raise TypeError(f"A dict model input needs at least one tensor, got keys {sorted(x)}.")
    return len(x)


def head_input_size(head: nn.Module) -> Optional[int]:
    """The number of input features a head expects, when its first layer says so (an ``nn.Linear``,
    possibly first in an ``nn.Sequential``); None when it cannot be told without running it."""
    while isinstance(head, nn.Sequential) and len(head) > 0:
        head = head[0]
    if isinstance(head, nn.Linear) and not isinstance(head, nn.modules.lazy.LazyModuleMixin):
        return int(head.in_features)
    return None


def head_input_error(task: str, head: nn.Module, features: Any, error: RuntimeError) -> Optional[TaskConfigError]:
    """A :class:`TaskConfigError` naming ``task``, what its head expects and the features' size, when
    ``error`` (raised by the head) is a size mismatch; None for any other error."""
    if isinstance(error, torch.OutOfMemoryError) or not _SHAPE_ERROR.search(str(error)):
        return None
    shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
    actual = f"shape {shape}" + (f" ({shape[-1]} features)" if isinstance(shape, tuple) and shape else "")
    expected = head_input_size(head)
    problem = (f"its head expects {expected} input features, but the encoder's features have {actual}" if expected is not None
               else f"its head ({type(head).__name__}) cannot be applied to the encoder's features of {actual}")
    return TaskConfigError(
        f"Task '{task}': {problem}. Make the head's input size match the encoder's out_features "
        f"(torch: {str(error).splitlines()[0] if str(error) else type(error).__name__})."
    )


class MultiTaskModule(pl.LightningModule):
    """``encoder`` (an architecture) → features by task → ``heads[task]`` → task outputs.

    Args:
        encoder: An :class:`~mtl_lightning.architectures.Architecture` (MMoE, MTAN, cross-stitch…),
            which receives the task names from the model, or any ``nn.Module``: hard parameter
            sharing. Exposes ``out_features`` unless every task brings its own head. A plain module
            may return a dict of per-task features and define ``regularization()`` (a λR(θ) term).
        tasks: The tasks (classification, multi-label, regression… side by side).
        optimizer: Optimizer factory (``class_path`` in YAML); learnable balancing weights get their
            own parameter group without weight decay.
        lr_scheduler: Optional LR scheduler factory.
        lr_scheduler_interval: ``"epoch"`` or ``"step"`` (per optimizer step).
        lr_scheduler_monitor: Metric fed to ``ReduceLROnPlateau``.
        gradient_clip_val: Clip gradients (after AMP unscaling) to this value; 0/None: no clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        accumulate_grad_batches: Micro-batches per optimizer step.
        input_key: Key of the model input in the batch dict: a tensor, or a dict of tensors (a transformer's
            ``input_ids`` and ``attention_mask``) that the encoder receives as it is.
        init_from: Checkpoint of an earlier (joint) run to start from: its encoder and the heads of
            the tasks configured here are loaded when fitting starts (task-specific fine-tuning:
            configure only the task to fine-tune). A resumed run's own checkpoint takes precedence.
        freeze_encoder: Keep the shared encoder fixed (and in eval mode); only heads train.
        parameter_groups: Optimizer options by parameter role, e.g. ``{"shared": {"lr": 1e-4}}``:
            ``shared`` (shared by all tasks), ``task`` (heads and task-own architecture parts),
            ``mixing`` (cross-stitch units, gates); roles not named keep the optimizer's defaults.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[Task],
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        lr_scheduler_interval: str = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        input_key: str = "input",
        init_from: Optional[str] = None,
        freeze_encoder: bool = False,
        parameter_groups: Optional[dict[str, dict[str, Any]]] = None,
    ) -> None:
        super().__init__()
        # Only plain options go into the checkpoint's hyperparameters: objects (encoder, tasks, factories)
        # would make checkpoints unloadable under torch.load(weights_only=True), the default for resuming.
        # Rebuild them from the config (the CLI does) or pass them to load_from_checkpoint.
        self.save_hyperparameters(ignore=["encoder", "tasks", "optimizer", "lr_scheduler"], logger=False)
        self.automatic_optimization = False
        tasks = list(tasks)
        if not tasks:
            raise TaskConfigError("MultiTaskModule needs at least one task.")
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TaskConfigError(f"Task names must be unique; repeated: {dupes}.")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}.")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}.")

        unknown_groups = sorted(set(parameter_groups or {}) - set(_PARAMETER_GROUPS))
        if unknown_groups:
            raise ValueError(f"parameter_groups: unknown role(s) {unknown_groups}; choose from {list(_PARAMETER_GROUPS)}.")

        self.encoder = encoder
        if isinstance(encoder, Architecture):
            encoder.bind(names)
        else:  # a plain module is hard sharing; the view is not registered (state-dict keys stay encoder.*)
            self.__dict__["_hard_sharing"] = HardSharing(encoder)
        self._check_roles(names)
        self.tasks: dict[str, Task] = {t.name: t for t in tasks}
        in_features = getattr(encoder, "out_features", None)
        heads = {}
        for task in tasks:
            if task.head is not None:
                heads[task.name] = task.head
            elif isinstance(in_features, int):
                heads[task.name] = task.build_head(in_features)
            else:
                raise TaskConfigError(
                    f"Task '{task.name}' has no head and the encoder {type(encoder).__name__} has no integer "
                    "'out_features' to build one; give the task a head or the encoder out_features."
                )
            expected = head_input_size(heads[task.name])
            if isinstance(in_features, int) and expected is not None and expected != in_features:
                raise TaskConfigError(
                    f"Task '{task.name}': its head expects {expected} input features, but the encoder "
                    f"{type(encoder).__name__} gives {in_features} (out_features); build the head for {in_features} inputs."
                )
        self.heads = nn.ModuleDict(heads)
        # The roles, read once (architectures are fixed once bound); requires_grad is checked per call.
        self._roles = self.architecture.parameter_roles()
        shared_ids = {id(p) for p in self._roles.shared}
        self._named_shared = [(n, p) for n, p in self.encoder.named_parameters() if id(p) in shared_ids]
        self._task_owned = {name: [*self.heads[name].parameters(), *self._roles.task_own.get(name, [])] for name in self.tasks}
        self.balancing_parameters = nn.ParameterDict()
        self._balancing_groups: dict[str, list[str]] = {}

        self.eval_metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({
                    # torchmetrics types a dict, not a Mapping
                    t.name: torchmetrics.MetricCollection(t.make_metrics()) for t in tasks  # type: ignore[arg-type]
                })
                for stage in ("val", "test")
            }
        )
        self.eval_losses = nn.ModuleDict(
            {stage: nn.ModuleDict({t.name: torchmetrics.MeanMetric() for t in tasks}) for stage in ("val", "test")}
        )
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self._step = MultiTaskStep(self, LightningBackend(self), accumulate_grad_batches)
        self.input_key = input_key
        self.init_from = init_from
        self.freeze_encoder = freeze_encoder
        self.parameter_groups = dict(parameter_groups or {})
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.balancer: BalancingMethod = EqualWeighting()
        self._checked_stages: set[tuple[str, str]] = set()  # (stage, task) pairs whose outputs were checked
        #: Per-task factor on the training loss (set by interventions such as negative-transfer
        #: down-weighting; 1.0 when absent). Persisted in checkpoints.
        self.task_loss_multipliers: dict[str, float] = {}
        #: Tasks whose head trains on detached shared features (no gradient into the encoder).
        self.detached_tasks: set[str] = set()
        self._spare_features: Any = None
        self._batch_layout: Optional[str] = None  # declared by the data module at setup
        self._epoch_sums: dict[str, list[Any]] = {}  # key -> [Σ value × batch size, Σ batch size] this epoch

    # ------------------------------------------------------------------ structure
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def architecture(self) -> Architecture:
        """The sharing architecture: the encoder itself, or hard sharing around a plain module."""
        return self.encoder if isinstance(self.encoder, Architecture) else self.__dict__["_hard_sharing"]

    def _check_roles(self, task_names: list[str]) -> None:
        """Every architecture parameter has exactly one role, and task-own parts name known tasks."""
        arch = self.architecture
        roles = arch.parameter_roles()
        names = {id(p): n for n, p in self.encoder.named_parameters()}
        seen: dict[int, str] = {}
        declared = [("shared", roles.shared), ("mixing", roles.mixing)]
        declared += [(f"task-own of '{t}'", ps) for t, ps in roles.task_own.items()]
        for role, params in declared:
            for p in params:
                if id(p) not in names:
                    raise ValueError(f"{type(arch).__name__} declares a {role} parameter that is not one of its own.")
                if seen.get(id(p), role) != role:
                    raise ValueError(f"{type(arch).__name__}: parameter '{names[id(p)]}' is declared both {seen[id(p)]} and {role}.")
                seen[id(p)] = role
        unassigned = [n for i, n in names.items() if i not in seen]
        if unassigned:
            raise ValueError(f"{type(arch).__name__} declares no role (shared, task-own, mixing) for parameter(s) {unassigned[:8]}.")
        unknown = sorted(set(roles.task_own) - set(task_names))
        if unknown:
            raise ValueError(f"{type(arch).__name__} has task-own parameters for unknown task(s) {unknown}.")

    def parameter_roles(self) -> ParameterRoles:
        """The architecture's roles, trainable parameters only."""
        roles = self._roles
        keep = lambda ps: [p for p in ps if p.requires_grad]  # noqa: E731
        return ParameterRoles(keep(roles.shared), {t: keep(ps) for t, ps in roles.task_own.items()}, keep(roles.mixing))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters shared by every task (what gradient methods arbitrate)."""
        return [p for _, p in self._named_shared if p.requires_grad]

    def named_shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of :meth:`shared_parameters`, names relative to the encoder."""
        return [(n, p) for n, p in self._named_shared if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Trainable parameters only ``task`` trains: its head and its own architecture parts."""
        return [p for p in self._task_owned[task] if p.requires_grad]

    def mixing_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters routing information between tasks (cross-stitch units, gates…)."""
        return [p for p in self._roles.mixing if p.requires_grad]

    def unshared_parameters(self) -> list[nn.Parameter]:
        """Every trainable model parameter gradient methods do not arbitrate: heads, task-own and
        mixing parameters (they get the unweighted sum of the task gradients)."""
        return [p for name in self.tasks for p in self.task_parameters(name)] + self.mixing_parameters()

    def register_balancing_parameters(
        self, owner: BalancingMethod, parameters: Mapping[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        """Attach a balancing method's learnable weights to the module (see ``BalancingMethod``).

        Returns the parameters the module holds under those keys: on a second ``setup`` (e.g. a
        ``validate`` after ``fit``) the already registered, trained ones.
        """
        keys = []
        for key, param in parameters.items():
            full = f"{owner.name}__{key}"
            if full not in self.balancing_parameters:
                self.balancing_parameters[full] = param
            keys.append(full)
        self._balancing_groups[owner.name] = keys
        return {key: self.balancing_parameters[f"{owner.name}__{key}"] for key in parameters}

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Per-task outputs (raw logits / values) for the input ``x``."""
        return self.heads_forward(self.encode(x)[1])

    def encode(self, x: Tensor, head_inputs: Optional[dict[str, Tensor]] = None) -> tuple[Any, Any]:
        """(representation, features): the shared representation z handed to balancing methods
        (features by task where the architecture has none) and what the heads read.

        With ``head_inputs`` (a dict to fill) and an architecture with a shared representation,
        every task reads z through its own alias (``z.view_as(z)``), stored there by task: the
        gradient engine then gets each task's ∂L_t/∂z from one backward of Σ_t L_t.
        """
        arch = self.architecture
        if not arch.has_representation:
            features = arch(x)
            return features, features
        z = arch.represent(x)
        if isinstance(z, Mapping) or isinstance(arch, HardSharing):
            return z, z  # the heads read z itself; heads_forward makes the aliases
        alias = head_inputs is not None and z.requires_grad
        per_task = {}
        for name in self.tasks:
            read_from = z.detach() if name in self.detached_tasks else z.view_as(z) if alias else z
            if head_inputs is not None:
                head_inputs[name] = read_from
            per_task[name] = arch.read(read_from, x, name)
        return z, per_task

    def heads_forward(
        self, features: Any, tasks: Optional[Sequence[str]] = None, head_inputs: Optional[dict[str, Tensor]] = None,
        interventions: bool = True,
    ) -> dict[str, Tensor]:
        """Outputs of the heads of ``tasks`` (default: every task) on the encoder's ``features``.

        With ``head_inputs`` (a dict to fill), each head reads its own alias of a shared feature tensor
        (``features.view_as(features)``), stored there by task: the gradient engine then gets every
        task's own ∂L_t/∂z from one backward of Σ_t L_t (a gradient w.r.t. an alias holds only the
        contributions through it).
        """
        names = list(self.heads) if tasks is None else list(tasks)
        if isinstance(features, Mapping):
            missing = [n for n in names if n not in features]
            if missing:
                raise TaskConfigError(f"The encoder returned features for {sorted(features)} but not for task(s) {missing}.")
            per_task = {name: features[name] for name in names}
        elif head_inputs is not None and isinstance(features, Tensor) and features.requires_grad:
            per_task = {name: features.view_as(features) for name in names}
        else:
            per_task = {name: features for name in names}
        if head_inputs is not None and not isinstance(features, Mapping):
            head_inputs.update(per_task)
        outputs = {}
        try:
            for name in names:
                outputs[name] = self.heads[name](
                    per_task[name].detach() if interventions and name in self.detached_tasks else per_task[name]
                )
        except RuntimeError as error:  # costs nothing unless a head fails; then name the task
            named = head_input_error(name, self.heads[name], per_task[name], error)
            if named is None:
                raise
            raise named from None  # the message carries torch's; the CLI shows this one
        return outputs

    def set_task_loss_multiplier(self, task: str, value: float) -> None:
        """Scale ``task``'s training loss by ``value`` from now on (1.0 restores it)."""
        if task not in self.tasks:
            raise KeyError(f"Unknown task '{task}'; tasks: {self.task_names}.")
        self.task_loss_multipliers[task] = float(value)

    def detach_task(self, task: str, detached: bool = True) -> None:
        """Stop (or restore) the flow of ``task``'s gradient into the shared encoder; its head keeps training."""
        if task not in self.tasks:
            raise KeyError(f"Unknown task '{task}'; tasks: {self.task_names}.")
        (self.detached_tasks.add if detached else self.detached_tasks.discard)(task)

    def _input(self, batch: Mapping[str, Any]) -> Any:
        """The model input of ``batch``: a tensor, or a dict of tensors (e.g. a transformer's
        ``input_ids`` and ``attention_mask``), which the encoder receives as it is."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"Batches must be dicts with an '{self.input_key}' key and one label key per task, got {type(batch).__name__}.")
        if self.input_key not in batch:
            nested = [k for k, v in batch.items() if isinstance(v, Mapping)]
            hint = (f" The batch looks task-routed ({{task: sub_batch}}, keys {nested}) but its sub-batches are not "
                    "named after the model's tasks." if nested else " Set model.input_key to the batch's input key.")
            raise KeyError(f"The batch has no input key '{self.input_key}' (keys: {sorted(batch)}).{hint}")
        return batch[self.input_key]

    def routed_tasks(self, batch: Any) -> Optional[dict[str, Mapping[str, Any]]]:
        """The sub-batches of a task-routed batch ``{task_name: sub_batch}``, or None for a
        single-dataset batch (``{input_key: …, label_key: …}`` shared by every task).

        The layout is the data module's ``batch_layout`` (``"shared"`` or ``"routed"``); without a
        data module (plain loaders) a batch is task-routed when every value is itself a dict. Each
        key of a routed batch must be a task name; each sub-batch holds that task's input and label.
        """
        layout = self._batch_layout
        if layout == "shared" or not isinstance(batch, Mapping) or not batch:
            return None
        if layout is None and not all(isinstance(v, Mapping) for v in batch.values()):
            return None
        unknown = sorted(set(batch) - set(self.tasks))
        if unknown:
            raise KeyError(
                f"Task-routed batch has sub-batches for unknown task(s) {unknown}; the model's tasks are "
                f"{self.task_names}. Each key of a {{task: sub_batch}} batch must be a task name."
            )
        return dict(batch)

    def _forward_batch(
        self, batch: Mapping[str, Any], stage: str, head_inputs: Optional[dict[str, Tensor]] = None
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
        """(features, outputs, targets) of the tasks the batch carries. A task-routed batch encodes
        each sub-batch separately (shapes may differ) and its features are a dict by task."""
        routed = self.routed_tasks(batch)
        interventions = stage != "monitor"
        if routed is None:
            features, head_features = self.encode(self._input(batch), head_inputs)
            outputs = self.heads_forward(head_features, head_inputs=head_inputs, interventions=interventions)
            targets = {name: task.get_target(batch) for name, task in self.tasks.items()}
        else:
            features, outputs, targets = {}, {}, {}
            for name, sub_batch in routed.items():
                head_features = self.encode(self._input(sub_batch))[1]
                features[name] = head_features[name] if isinstance(head_features, Mapping) else head_features
                outputs[name] = self.heads_forward(head_features, [name], interventions=interventions)[name]
                targets[name] = self.tasks[name].get_target(sub_batch)
                if stage == "train" and name == next(iter(routed)):
                    self._spare_features = head_features  # feeds the heads of tasks the batch lacks
        for name in outputs:
            if (stage, name) not in self._checked_stages:
                self.tasks[name].check_output(outputs[name], targets[name])
                self._checked_stages.add((stage, name))
        return features, outputs, targets

    def compute_losses(
        self, batch: Mapping[str, Any], stage: str = "train", head_inputs: Optional[dict[str, Tensor]] = None
    ) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
        """Encode, run the heads, and compute each task's mean loss over its labelled samples.

        ``head_inputs``: a dict to fill with the tensor each head read (see :meth:`heads_forward`).
        ``stage``: ``"train"`` applies the interventions (loss multipliers, detached tasks);
        ``"monitor"`` measures each task as it would act (no intervention) and does not check
        finiteness (a lookahead loss may diverge).

        Returns (features, outputs, losses); a task with no labelled sample (or, in a task-routed
        batch, no sub-batch) is absent from losses and outputs.
        Raises ``FloatingPointError`` naming the task when a loss is not finite.
        """
        features, outputs, targets = self._forward_batch(batch, stage, head_inputs)
        counts = torch.stack([self.tasks[n].valid_mask(targets[n]).sum() for n in outputs]).tolist()
        losses = {
            name: self.tasks[name].loss(outputs[name], targets[name])
            for name, count in zip(outputs, counts)
            if count > 0
        }
        if stage == "train":
            for name, factor in self.task_loss_multipliers.items():
                if name in losses and factor != 1.0:
                    losses[name] = losses[name] * factor
        if losses and stage != "monitor" and not bool(torch.isfinite(torch.stack([l.detach() for l in losses.values()])).all()):
            bad = [n for n, l in losses.items() if not math.isfinite(float(l))]
            raise FloatingPointError(
                f"Non-finite loss for task(s) {bad} at {stage} step {self.global_step} "
                f"(values: {{{', '.join(f'{n}: {float(losses[n])}' for n in bad)}}}). "
                "Check that task's labels, its head, the learning rate and the balancing method."
            )
        return features, outputs, losses

    def regularization(self) -> Optional[Tensor]:
        """The encoder's λR(θ) term (soft parameter sharing), or None."""
        fn = getattr(self.encoder, "regularization", None)
        return fn() if callable(fn) else None

    # ------------------------------------------------------------------ lifecycle
    def load_pretrained(self, path: str) -> None:
        """Load the architecture and this model's task heads from a checkpoint of another run.

        Shared and mixing parameters must all be in the checkpoint; a task's own parts (its head,
        its gate, tower or attention modules) start fresh when the checkpoint has none for it.
        """
        checkpoint = read_checkpoint(path, what="init_from")  # weights_only=True; a clear error naming the file
        state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, Mapping) else {}
        own_state = self.state_dict()
        roles = self.architecture.parameter_roles()
        names = {id(p): f"encoder.{n}" for n, p in self.encoder.named_parameters()}
        owner = {names[id(p)]: task for task, params in roles.task_own.items() for p in params}
        wanted, fresh = {}, set()
        for key in own_state:
            if not (key.startswith("encoder.") or key.startswith("heads.")):
                continue
            task = key.split(".")[1] if key.startswith("heads.") else owner.get(key)
            if key not in state:
                if task is None:
                    raise KeyError(
                        f"init_from={path!r}: the checkpoint's encoder does not match this model "
                        f"(no '{key}'; it has {sorted(k for k in state if k.startswith('encoder.'))[:5] or 'no encoder weights'})."
                    )
                fresh.add(task)
                continue
            if tuple(state[key].shape) != tuple(own_state[key].shape):
                raise ValueError(
                    f"init_from={path!r}: '{key}' has shape {tuple(state[key].shape)} in the checkpoint but "
                    f"{tuple(own_state[key].shape)} here (an architecture built for other tasks?)."
                )
            wanted[key] = state[key]
        self.load_state_dict(wanted, strict=False)
        if fresh:
            rank_zero_info(f"init_from: nothing in the checkpoint for the own parts of task(s) {sorted(fresh)}; they start fresh.")

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from and not getattr(self, "_pretrained_loaded", False):
            self.load_pretrained(self.init_from)
            self._pretrained_loaded = True
        datamodule = getattr(self.trainer, "datamodule", None)
        self._check_data_contract(datamodule)
        by_task = getattr(datamodule, "label_keys_by_task", None)
        available = None if by_task is not None else getattr(datamodule, "label_keys", None)
        if by_task is not None:
            self._check_task_datasets(datamodule, by_task)
        if available is not None:
            for task in self.tasks.values():
                if task.label_key not in available:
                    raise TaskConfigError(
                        f"Task '{task.name}' reads label key '{task.label_key}', which the data module "
                        f"{type(datamodule).__name__} does not provide (it provides {sorted(available)})."
                    )
        self._check_data(datamodule, stage)
        balancers = [cb for cb in trainer_callbacks(self.trainer) if isinstance(cb, BalancingMethod)]
        if len(balancers) > 1:
            raise ValueError(
                "Only one balancing method can be used at a time; trainer.callbacks has "
                f"{[b.name for b in balancers]}. Keep one of them."
            )
        if balancers:
            self.balancer = balancers[0]
        else:
            self.balancer = EqualWeighting()
            self.balancer.setup(self.trainer, self, stage)
        per_step = getattr(datamodule, "tasks_per_step", "all")
        if self.balancer.needs_all_tasks_per_step and per_step != "all":
            raise ValueError(
                f"{self.balancer.name} needs the loss of every task at every step (it combines per-task "
                f"gradients of the same step), but the data module draws {per_step!r} task(s) per step. "
                "Use an all-tasks-per-step mixing policy or a loss-weighting method."
            )

    def _check_data_contract(self, datamodule: Any) -> None:
        """Adopt the data module's declared batch layout; its input key must be the model's."""
        layout = getattr(datamodule, "batch_layout", None)
        if layout not in (None, "shared", "routed"):
            raise ValueError(f"{type(datamodule).__name__}.batch_layout must be 'shared' or 'routed', got {layout!r}.")
        self._batch_layout = layout
        key = getattr(datamodule, "input_key", None)
        if key is not None and key != self.input_key:
            raise TaskConfigError(
                f"{type(datamodule).__name__} puts the model input under '{key}', but model.input_key is "
                f"'{self.input_key}'; set model.input_key: {key} (or the data module's input_key)."
            )

    def _check_task_datasets(self, datamodule: Any, by_task: Mapping[str, set[str]]) -> None:
        """With one dataset per task: every task has one, providing its label, and no dataset is orphaned."""
        name = type(datamodule).__name__
        missing = [t for t in self.tasks if t not in by_task]
        extra = sorted(set(by_task) - set(self.tasks))
        if missing or extra:
            raise TaskConfigError(
                f"{name} has datasets for tasks {sorted(by_task)}, the model has tasks {self.task_names}: "
                + (f"no dataset for {missing}. " if missing else "")
                + (f"no task for dataset(s) {extra}." if extra else "")
            )
        for task in self.tasks.values():
            if task.label_key not in by_task[task.name]:
                raise TaskConfigError(
                    f"Task '{task.name}' reads label key '{task.label_key}', which its dataset in {name} "
                    f"does not provide (it provides {sorted(by_task[task.name])})."
                )

    def _check_data(self, datamodule: Any, stage: str) -> None:
        """Validate, once at set-up, the data every task will see (any batch layout): no split is
        empty, every label is one its task accepts (:meth:`Task.validate_labels`, vectorised over the
        label tensor the dataset holds), and, before fitting, every task has a labelled training
        sample. Datasets that cannot expose their labels cheaply (no ``label_tensor``) are skipped."""
        split_datasets = getattr(datamodule, "split_datasets", None)
        if not callable(split_datasets):
            return
        owner = type(datamodule).__name__
        for task in self.tasks.values():
            for split, dataset in split_datasets(task.name).items():
                of_task = f" of task '{task.name}'" if self._batch_layout == "routed" else ""
                size = len(dataset) if hasattr(dataset, "__len__") else None
                if size == 0:
                    raise ValueError(f"{owner}: the '{split}' split{of_task} is empty (0 samples).")
                labels = dataset_labels(dataset, task.label_key)
                if labels is None:
                    continue
                labelled = task.validate_labels(labels, f"the {split} split of {owner}")
                if split == "train" and stage == "fit" and labelled == 0:
                    raise TaskConfigError(
                        f"Task '{task.name}': no labelled sample in the train split of {owner} (all {len(labels)} "
                        "labels are missing), so it would never train; check how the data marks missing labels "
                        "(e.g. a missing_labels fraction of 1.0) or remove the task."
                    )

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The model's trainable parameters: one group, or one per role named in ``parameter_groups``."""
        balancing_ids = {id(p) for p in self.balancing_parameters.values()}
        model = [p for p in self.parameters() if p.requires_grad and id(p) not in balancing_ids]
        if not self.parameter_groups:
            return [{"params": model}]
        by_role = {"shared": self.shared_parameters(), "mixing": self.mixing_parameters(),
                   "task": [p for name in self.tasks for p in self.task_parameters(name)]}
        groups: list[dict[str, Any]] = []
        placed: set[int] = set()
        for role, options in self.parameter_groups.items():
            params = by_role[role]
            if not params:
                raise ValueError(f"parameter_groups: the {type(self.architecture).__name__} model has no trainable '{role}' parameter.")
            groups.append({"params": params, **options})
            placed.update(id(p) for p in params)
        rest = [p for p in model if id(p) not in placed]
        return groups + ([{"params": rest}] if rest else [])

    def configure_optimizers(self) -> Any:
        groups = self._parameter_groups()
        owners = {b.name: b for b in trainer_callbacks(self.trainer) if isinstance(b, BalancingMethod)}
        for owner_name, keys in self._balancing_groups.items():
            options = dict(getattr(owners.get(owner_name), "parameter_group_options", {}))
            groups.append({"params": [self.balancing_parameters[k] for k in keys], "weight_decay": 0.0, **options})
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval, "monitor": self.lr_scheduler_monitor},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtl_interventions"] = {
            "task_loss_multipliers": dict(self.task_loss_multipliers),
            "detached_tasks": sorted(self.detached_tasks),
        }
        checkpoint["mtl_rng"] = global_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        interventions = checkpoint.get("mtl_interventions", {})
        self.task_loss_multipliers = dict(interventions.get("task_loss_multipliers", {}))
        self.detached_tasks = set(interventions.get("detached_tasks", []))
        trainer = getattr(self, "_trainer", None)
        if "mtl_rng" in checkpoint and trainer is not None and trainer.state.fn == "fit":  # resuming a fit
            set_global_rng_state(checkpoint["mtl_rng"])
        # A checkpoint trained with learnable balancing weights loads into a module without that
        # balancing method (e.g. for inference or fine-tuning): drop the weights it has no slot for.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(_BALANCING_PREFIX)]:
            if key[len(_BALANCING_PREFIX):] not in self.balancing_parameters:
                del state[key]

    # ------------------------------------------------------------------ training
    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over DDP ranks (a copy; identity on one process)."""
        if self.trainer.world_size <= 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="mean")

    @property
    def accumulate_grad_batches(self) -> int:
        """Micro-batches per optimizer step (the training step's)."""
        return self._step.accumulate_grad_batches

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {value}.")
        self._step.accumulate_grad_batches = int(value)

    def _is_last_microbatch(self, batch_idx: int) -> bool:
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or bool(self.trainer.is_last_batch)

    def training_losses(self, batch: Mapping[str, Any]) -> TrainingLosses:
        """The training forward pass of a micro-batch: features, task losses, head aliases and the
        zero anchor of the outputs of tasks without a loss (see :class:`~mtl_lightning.core.context.TrainingLosses`)."""
        head_inputs: dict[str, Tensor] = {}
        features, outputs, losses = self.compute_losses(batch, "train", head_inputs)
        if not losses:
            raise ValueError(
                f"Training batch at step {self.global_step} has no label for any task ({self.task_names}); "
                "every training batch needs at least one labelled sample."
            )
        # Outputs of tasks without labels in this batch take part in the graph with weight 0 so
        # that DDP sees a gradient (zero) for every head. Heads a task-routed batch does not reach
        # run on the first sub-batch's features for that purpose.
        unreached = [n for n in self.tasks if n not in outputs]
        if unreached:
            spare, self._spare_features = self._spare_features, None
            outputs = {**outputs, **self.heads_forward(spare, unreached)}
        absent = [outputs[n] for n in self.tasks if n not in losses]
        anchor = sum((o.float().sum() * 0.0 for o in absent), torch.zeros((), device=self.device)) if absent else None
        routed = self.routed_tasks(batch)
        batch_size = (sum(input_batch_size(self._input(b)) for b in routed.values()) if routed is not None
                      else input_batch_size(self._input(batch)))
        return TrainingLosses(features, losses, head_inputs or None, anchor, batch_size)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        result = self._step(batch, self.balancer, self.global_step, self.current_epoch, self._is_last_microbatch(batch_idx))
        self._log_training(result, self.routed_tasks(batch))

    def _is_logging_step(self) -> bool:
        """Whether the loggers write this training batch (Lightning's ``log_every_n_steps`` rule)."""
        trainer = self.trainer
        if fast_dev_run(trainer):
            return True
        every = log_every_n_steps(trainer)
        return every > 0 and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0

    def _log_training(self, result: Any, routed: Optional[Mapping[str, Any]]) -> None:
        """Step values (``train/<task>/loss_step``, ``…/weight``, ``train/loss_step``) at the steps the
        loggers write; epoch means (``…_epoch``, ``train/<task>/step_share``) from running sums,
        logged at the epoch's end (one ``self.log`` per key per epoch instead of per step)."""
        sums, size = self._epoch_sums, float(result.batch_size)
        detached = {name: loss.detach() for name, loss in result.losses.items()}
        total = sum(detached.values())
        entries = [(f"train/{name}/loss", value, size) for name, value in detached.items()] + [("train/loss", total, size)]
        if result.regularization is not None:
            entries.append(("train/regularization", result.regularization.detach(), size))
        for key, value, weight in entries:
            acc = sums.get(key)
            sums[key] = [value.float() * weight, weight] if acc is None else [acc[0] + value.float() * weight, acc[1] + weight]
        if routed is not None:
            # Mean over the epoch's steps = the realized share of steps that trained each task.
            for name in self.tasks:
                acc = sums.setdefault(f"train/{name}/step_share", [0.0, 0.0])
                acc[0] += float(name in routed)
                acc[1] += 1.0
        if not self._is_logging_step():
            return
        for key, value, _ in entries:
            self.log(f"{key}_step", value, on_step=True, on_epoch=False, prog_bar=key == "train/loss")
        for name, weight in result.weights.items():
            self.log(f"train/{name}/weight", torch.as_tensor(weight, dtype=torch.float32).detach(), on_step=True, on_epoch=False)

    def _log_epoch_means(self) -> None:
        sums, self._epoch_sums = self._epoch_sums, {}
        for key, (total, weight) in sums.items():
            name = key if key.endswith("step_share") else f"{key}_epoch"
            self.log(name, total / weight, on_step=False, on_epoch=True, prog_bar=key == "train/loss")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after AMP unscaling, so the clip threshold applies to true gradients.
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = {}
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: no dropout, no batch-norm statistics updates

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means()
        self._log_architecture_statistics()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.lr_scheduler_interval == "epoch" and self.epoch_ran_to_its_end():
            self.step_scheduler(scheduler)

    def epoch_ran_to_its_end(self) -> bool:
        """Whether the training epoch ending now took all its batches. Lightning also calls the epoch-end
        hooks when training stops inside an epoch (``max_steps``); a run resumed from that point finishes
        the epoch and ends it again, so epoch-level updates (an epoch-interval LR scheduler) wait for the
        real end — as Lightning's own scheduler stepping does — and a resumed run equals an uninterrupted one."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or progress.current.ready >= self.trainer.num_training_batches

    def _log_architecture_statistics(self) -> None:
        """Log what the architecture accumulated this epoch (averaged over steps and ranks); a T×T
        matrix (a task-graph adjacency) is also logged per task pair and written as a heatmap."""
        stats = self.architecture.statistics()
        if not stats:
            return
        keys = sorted(k for k in stats if k != "count")
        packed = torch.cat([stats["count"].reshape(1).float(), *[stats[k].float().reshape(-1) for k in keys]])
        if self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
        count, values = packed[0].clamp_min(1), packed[1:].split([stats[k].numel() for k in keys])
        names = self.task_names
        log_dir = self.trainer.log_dir  # broadcasts: every rank asks
        for key, value in zip(keys, values):
            mean = (value / count).view(stats[key].shape).cpu()
            if mean.shape == (len(names), len(names)):
                for i, a in enumerate(names):
                    for j, b in enumerate(names):
                        self.log(f"arch/{key}/{a}/{b}", float(mean[i, j]), rank_zero_only=True)
                if self.trainer.is_global_zero and log_dir is not None:
                    self._save_matrix(mean, key, log_dir)
            else:
                self.log(f"arch/{key}", float(mean.mean()), rank_zero_only=True)

    def _save_matrix(self, matrix: Tensor, key: str, log_dir: str) -> None:
        try:
            from mtl_lightning.monitoring.report import save_heatmap
            path = os.path.join(log_dir, "architecture", f"{key}_epoch{self.current_epoch}.png")
            save_heatmap(matrix, self.task_names, f"{type(self.architecture).__name__} {key} (epoch {self.current_epoch})",
                         path, "task j (read from)", "task i (reads)")
        except ImportError:  # matplotlib is the optional 'plots' extra: say so once, keep the logged values
            if not getattr(self, "_warned_no_plots", False):
                self._warned_no_plots = True
                rank_zero_warn(
                    f"{type(self.architecture).__name__}: matplotlib is not installed, so the '{key}' heatmaps "
                    f"(architecture/{key}_epoch<k>.png) are not written; the values are logged as arch/{key}/<i>/<j>. "
                    'For the PNGs: pip install "mtl-lightning[plots]"'
                )

    def step_scheduler(self, scheduler: Any) -> None:
        """Step an LR scheduler (``ReduceLROnPlateau`` on ``lr_scheduler_monitor``)."""
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.trainer.callback_metrics.get(self.lr_scheduler_monitor)
            if value is None:
                raise KeyError(
                    f"ReduceLROnPlateau monitors '{self.lr_scheduler_monitor}', which was not logged; "
                    f"logged metrics: {sorted(self.trainer.callback_metrics)}. Set model.lr_scheduler_monitor."
                )
            scheduler.step(value)
        else:
            scheduler.step()

    # ------------------------------------------------------------------ evaluation
    def _eval_loss(self, stage: str, task: str) -> torchmetrics.MeanMetric:
        return cast(torchmetrics.MeanMetric, cast(nn.ModuleDict, self.eval_losses[stage])[task])

    def _eval_metrics(self, stage: str, task: str) -> torchmetrics.MetricCollection:
        return cast(torchmetrics.MetricCollection, cast(nn.ModuleDict, self.eval_metrics[stage])[task])

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        _, outputs, targets = self._forward_batch(batch, stage)
        for name, output in outputs.items():
            task, target = self.tasks[name], targets[name]
            mask = task.valid_mask(target)
            count = int(mask.sum())
            if count == 0:
                continue
            self._eval_loss(stage, name).update(task.loss(output, target), weight=count)
            self._eval_metrics(stage, name).update(*task.metric_inputs(output, target))

    # With one loader per task (multi-dataset mixing) batches are task-routed, so metrics are
    # accumulated by task and the dataloader index is not needed.
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        total = 0.0
        for name in self.tasks:
            loss = self._eval_loss(stage, name).compute()
            values = {k: float(v) for k, v in self._eval_metrics(stage, name).compute().items()} if torch.isfinite(loss) else None
            # Reset outside inference mode: states created inside it could not be updated by a later
            # validation that runs under no_grad (validate() followed by fit()).
            with torch.inference_mode(False):
                self._eval_loss(stage, name).reset()
                self._eval_metrics(stage, name).reset()
            if values is None:  # no labelled sample on any rank
                continue
            total += float(loss)
            results[name] = values
            self.log(f"{stage}/{name}/loss", float(loss), add_dataloader_idx=False)
            for metric, value in values.items():
                self.log(f"{stage}/{name}/{metric}", value, add_dataloader_idx=False)
        if results:
            self.log(f"{stage}/loss", total, add_dataloader_idx=False)
        baselines = {n: t.baselines for n, t in self.tasks.items() if t.baselines}
        if baselines:
            directions = {n: t.higher_is_better() for n, t in self.tasks.items()}
            delta = delta_mtl(results, baselines, directions)
            if delta is not None:
                self.log(f"{stage}/delta_mtl", delta.delta_mtl, add_dataloader_idx=False)
                self.log(f"{stage}/delta_m", delta.delta_m, add_dataloader_idx=False)
                for name, value in delta.per_task.items():
                    self.log(f"{stage}/{name}/delta", value, add_dataloader_idx=False)
        return results

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        routed = self.routed_tasks(batch)
        if routed is not None:
            outputs = {n: self.heads_forward(self.encode(self._input(b))[1], [n])[n] for n, b in routed.items()}
            return {name: self.tasks[name].predict(out) for name, out in outputs.items()}
        x = self._input(batch) if isinstance(batch, Mapping) else batch
        outputs = self(x)
        return {name: self.tasks[name].predict(out) for name, out in outputs.items()}


def global_rng_state() -> dict[str, Tensor]:
    """The global torch RNG state (CPU, and the current CUDA device's once CUDA is in use): what the
    model draws from in training (dropout). Checkpointed, so a resumed run draws what an
    uninterrupted one would; every other draw (data order, mixing, balancing methods) has its own
    seeded, checkpointed generator."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_global_rng_state(state: Mapping[str, Tensor]) -> None:
    """Restore a :func:`global_rng_state` (the CUDA part where CUDA is available)."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
