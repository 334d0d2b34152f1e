"""Negative-transfer monitoring: see when one task hurts another during training, and act.

:class:`NegativeTransferMonitor` is a Lightning callback (not a balancing method: it runs beside
any balancing callback). Every ``interval`` optimizer steps it re-evaluates the training batch
with the model in eval mode and measures, from all DDP ranks:

* gradient geometry of the task gradients on the shared parameters (cosine, gradient magnitude
  similarity, norms, running conflict rate; per shared layer on request), from the shared
  per-task gradient engine;
* TAG's inter-task affinity (Fifty et al. 2021, arXiv 2109.04617): a lookahead step of the shared
  parameters along each task's gradient through the real optimizer, heads unchanged, and the
  relative change of every task's loss on the same batch, Z_{i→j} = 1 − L_j(θ'_i) / L_j(θ'_∅).
  θ'_∅ is the optimizer's step with a zero gradient (its momentum and weight decay alone): that
  part of every lookahead is the same whatever the task, so comparing against it leaves the
  effect of task i's own gradient. With plain SGD θ'_∅ = θ, which is TAG's definition;
  ``affinity_reference="current"`` compares against θ as TAG's official code does (see
  :class:`NegativeTransferMonitor` for why that is not the default).

At every validation it reads the per-task Δ against single-task baselines (logged by the module
once baselines are known) and the per-task validation losses. Rules turn the signals into flagged
tasks (see :class:`NegativeTransferMonitor`), and each flag triggers the configured action.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from typing import Any, Iterator, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from mtl_lightning.core.engine import flatten_jacobian, task_jacobian
from mtl_lightning.monitoring.grouping import MAX_TASKS_EXHAUSTIVE, select_networks
from mtl_lightning.monitoring.report import PLOTS_HINT, HeatmapWriter, plots_available, write_report
from mtl_lightning.monitoring.signals import gradient_geometry, lookahead_updates

ACTIONS = ("warn", "downweight", "detach", "stop")
RULES = ("harms_others", "negative_delta", "diverging_loss")
AFFINITY_REFERENCES = ("zero_gradient", "current")


def load_baselines(path: str) -> dict[str, dict[str, float]]:
    """Read a baselines file: YAML ``{task: {metric: single-task value}}`` (as written by
    ``python -m mtl_lightning.monitoring.baselines``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"baselines_file '{path}' does not exist; write it with `python -m mtl_lightning.monitoring.baselines`.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise ValueError(f"baselines_file '{path}' must map each task to {{metric: value}}, got {data!r}.")
    return {str(t): {str(m): float(v) for m, v in metrics.items()} for t, metrics in data.items()}


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the measurement: deterministic (no dropout, no RNG draw) and no BatchNorm
    statistics update, so training is unaffected. Restores each submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class NegativeTransferMonitor(Callback):
    """Measure negative-transfer signals every ``interval`` steps, flag tasks, act, and report.

    Affinity reference. With a stateful optimizer most of every lookahead step is the optimizer's
    own momentum (Adam: β1 = 0.9 of the first moment), identical for every source task. Measured
    against θ (TAG's official code), that common step adds the same offset to every Z_{i→j} of a
    target j, and the offset changes sign during training (it helps everyone early; once one
    task dominates the momentum it can hurt everyone). Against θ'_∅ (the default) the offset
    cancels and Z_{i→j} is the effect of task i's gradient alone.

    Rules (a task is flagged at most once per rule; the action is applied the first time a task
    is flagged):

    * ``harms_others`` — the task's lookahead raised the loss of *every* other task, each
      significantly: for every j ≠ i the mean of Z_{i→j} is negative with a t-statistic (across
      measurements) below −``harm_significance``. This is an intersection-union test: "hurts
      every other task" holds at the level of each one-target test. The harm must also be
      material, not only significant: −mean Z_{i→j} ≥ ``harm_min_fraction`` × mean Z_{j→j}, i.e.
      task i's step undoes at least that fraction of what task j's own step achieves (any harm
      counts when j's own step no longer lowers its loss). It is checked over two spans:
      the last ``window`` measurements (harm that starts late) and every measurement since the
      rule last flagged a task, or since the start (harm that persists but is weak per window; TAG
      likewise averages the affinity over training). A task that helps its own group and hurts
      another is not flagged (that is a grouping question, see the report). When several tasks
      qualify, the one whose least-hurt target has the most negative t is flagged and the evidence
      restarts, so a mutual conflict of two tasks flags one of them.
    * ``negative_delta`` — Δ_t < −``delta_tolerance`` (% against the single-task baseline) at
      ``patience`` consecutive validations, checked from epoch ``delta_from_epoch`` on (None:
      never during training; Δ at the last validation is always in the report).
    * ``diverging_loss`` — the task's validation loss rose at each of the last ``patience``
      validations while the other tasks' losses fell (mean log-change < 0) over the same span.

    Actions (``action``): ``warn`` (log only), ``downweight`` (multiply the task's training loss by
    ``downweight_factor``), ``detach`` (its head keeps training on detached shared features),
    ``stop`` (end the run). Every flag is logged with step and evidence.

    Args:
        interval: Measure every this many optimizer steps.
        action: What to do when a task is flagged (one of ``ACTIONS``).
        downweight_factor: Loss multiplier applied by ``downweight`` (in (0, 1)).
        window: Measurements in the recent span of ``harms_others``, and the least it needs before deciding.
        harm_significance: t-statistic threshold of ``harms_others``, per target (3 with the default
            window of 10: a one-sided level of about 0.008 for a target whose true affinity is 0).
        harm_min_fraction: Smallest material harm of ``harms_others``, as a fraction of each target's
            own progress per step (0.5: the task undoes at least half of it).
        affinity_reference: ``"zero_gradient"`` (Z against the optimizer's step without gradient)
            or ``"current"`` (against the current parameters, as TAG's official code).
        patience: Consecutive validations needed by ``negative_delta`` and ``diverging_loss``.
        delta_tolerance: Margin (%) of ``negative_delta``.
        delta_from_epoch: First epoch at which ``negative_delta`` may act (None: report only).
        baselines: ``{task: {metric: value}}`` single-task baselines (fill the tasks' ``baselines``).
        baselines_file: YAML file with the same content (see ``mtl_lightning.monitoring.baselines``).
        per_layer: Also log the gradient cosine per shared layer (module owning the parameters).
        max_networks: Budget on the number of networks of the recommended grouping (None: T).
        output_dir: Where PNGs and the report go (default: ``<checkpoint dir or log dir>/negative_transfer``).
            The PNGs need matplotlib (``pip install "mtl-lightning[plots]"``); without it the monitor
            says so once at set-up and writes the report without them.
        plot_every_n_epochs: Also write heatmaps at the end of every n-th training epoch (default 0:
            only the final ones; each pair costs about 0.1-0.2 s of CPU whatever the epoch's length,
            and the logged scalars already show how the signals evolve).
        batched_jacobian: One vmapped backward for all tasks (falls back to a loop when unsupported).
    """

    def __init__(
        self,
        interval: int = 50,
        action: str = "warn",
        downweight_factor: float = 0.1,
        window: int = 10,
        harm_significance: float = 3.0,
        harm_min_fraction: float = 0.5,
        affinity_reference: str = "zero_gradient",
        patience: int = 3,
        delta_tolerance: float = 0.0,
        delta_from_epoch: Optional[int] = None,
        baselines: Optional[dict[str, dict[str, float]]] = None,
        baselines_file: Optional[str] = None,
        per_layer: bool = False,
        max_networks: Optional[int] = None,
        output_dir: Optional[str] = None,
        plot_every_n_epochs: int = 0,
        batched_jacobian: bool = True,
    ) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"NegativeTransferMonitor: action must be one of {ACTIONS}, got {action!r}.")
        if affinity_reference not in AFFINITY_REFERENCES:
            raise ValueError(
                f"NegativeTransferMonitor: affinity_reference must be one of {AFFINITY_REFERENCES}, got {affinity_reference!r}."
            )
        for option, value, low in (("interval", interval, 1), ("window", window, 1), ("patience", patience, 1), ("plot_every_n_epochs", plot_every_n_epochs, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"NegativeTransferMonitor: {option} must be an integer >= {low}, got {value!r}.")
        if not 0.0 < downweight_factor < 1.0:
            raise ValueError(f"NegativeTransferMonitor: downweight_factor must lie in (0, 1), got {downweight_factor}.")
        for option, bound in (("harm_significance", harm_significance), ("harm_min_fraction", harm_min_fraction), ("delta_tolerance", delta_tolerance)):
            if not bound >= 0:
                raise ValueError(f"NegativeTransferMonitor: {option} must be >= 0, got {bound!r}.")
        if max_networks is not None and max_networks < 1:
            raise ValueError(f"NegativeTransferMonitor: max_networks must be >= 1, got {max_networks}.")
        self.interval = interval
        self.action = action
        self.downweight_factor = downweight_factor
        self.window = window
        self.harm_significance = harm_significance
        self.harm_min_fraction = harm_min_fraction
        self.affinity_reference = affinity_reference
        self.patience = patience
        self.delta_tolerance = delta_tolerance
        self.delta_from_epoch = delta_from_epoch
        self.baselines = {t: dict(m) for t, m in (baselines or {}).items()}
        self.baselines_file = baselines_file
        self.per_layer = per_layer
        self.max_networks = max_networks
        self.output_dir = output_dir
        self.plot_every_n_epochs = plot_every_n_epochs
        self.batched_jacobian = batched_jacobian
        self.task_names: list[str] = []
        self._resolved_dir: Optional[str] = None
        self._heatmap_writer = HeatmapWriter()
        self._plots: Optional[bool] = None  # matplotlib importable (checked at set-up)
        self._last_measured_step = -1
        self._reset_state(0)

    # ------------------------------------------------------------------ state
    def _reset_state(self, num_tasks: int) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.measurements = 0
        self.cosine_sum, self.cosine_count = zeros(num_tasks, num_tasks), zeros(num_tasks, num_tasks)
        self.gms_sum, self.conflict_count = zeros(num_tasks, num_tasks), zeros(num_tasks, num_tasks)
        self.norm_sum, self.norm_count = zeros(num_tasks), zeros(num_tasks)
        self.affinity_sum, self.affinity_count = zeros(num_tasks, num_tasks), zeros(num_tasks, num_tasks)
        # Evidence of the harms_others rule: the last `window` matrices, and running sums of Z, Z² and
        # counts since the rule's last decision.
        self.recent_affinity: deque[Tensor] = deque(maxlen=self.window)
        self.harm_sum, self.harm_sumsq, self.harm_count = (zeros(num_tasks, num_tasks) for _ in range(3))
        self.val_losses: list[dict[str, float]] = []
        self.val_deltas: list[dict[str, float]] = []
        self.flagged: list[dict[str, Any]] = []
        self.acted_on: list[str] = []
        self.notes: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "task_names": self.task_names,
            "measurements": self.measurements,
            "tensors": {k: getattr(self, k).clone() for k in self._TENSORS},
            "recent_affinity": [m.clone() for m in self.recent_affinity],
            "val_losses": self.val_losses,
            "val_deltas": self.val_deltas,
            "flagged": self.flagged,
            "acted_on": self.acted_on,
            "notes": self.notes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.task_names and state_dict["task_names"] != self.task_names:
            raise ValueError(
                f"NegativeTransferMonitor: the checkpoint was written for tasks {state_dict['task_names']}, "
                f"the model has {self.task_names}."
            )
        self.task_names = list(state_dict["task_names"])
        self.measurements = state_dict["measurements"]
        for key, value in state_dict["tensors"].items():
            setattr(self, key, value.clone())
        self.recent_affinity = deque((m.clone() for m in state_dict["recent_affinity"]), maxlen=self.window)
        for key in ("val_losses", "val_deltas", "flagged", "acted_on", "notes"):
            setattr(self, key, list(state_dict[key]))

    _TENSORS = ("cosine_sum", "cosine_count", "gms_sum", "conflict_count", "norm_sum", "norm_count", "affinity_sum",
                "affinity_count", "harm_sum", "harm_sumsq", "harm_count")

    # ------------------------------------------------------------------ averages
    @staticmethod
    def _ratio(total: Tensor, count: Tensor) -> Tensor:
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))

    @property
    def mean_affinity(self) -> Tensor:
        """Z̄_{i→j} averaged over all measurements so far (rows: source i, columns: target j)."""
        return self._ratio(self.affinity_sum, self.affinity_count)

    @property
    def mean_cosine(self) -> Tensor:
        return self._ratio(self.cosine_sum, self.cosine_count)

    @property
    def conflict_rate(self) -> Tensor:
        return self._ratio(self.conflict_count, self.cosine_count)

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from mtl_lightning.models.module import MultiTaskModule

        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError(f"NegativeTransferMonitor needs a MultiTaskModule, got {type(pl_module).__name__}.")
        names = pl_module.task_names
        if len(names) < 2:
            raise ValueError(f"NegativeTransferMonitor needs at least two tasks to compare, the model has {names}.")
        if len(names) > MAX_TASKS_EXHAUSTIVE:
            self.notes.append(f"{len(names)} tasks: the recommended grouping is skipped (exhaustive up to {MAX_TASKS_EXHAUSTIVE}).")
        if not pl_module.shared_parameters():
            raise ValueError(
                f"NegativeTransferMonitor: {type(pl_module.architecture).__name__} has no trainable parameter shared "
                "by all tasks; there is nothing through which tasks could transfer."
            )
        if self.task_names != names:
            self.task_names = list(names)
            self._reset_state(len(names))
        self._install_baselines(pl_module)
        if self._plots is None:
            self._plots = plots_available()
            if not self._plots:
                self._warn_no_plots()

    def _warn_no_plots(self) -> None:
        self._plots = False
        rank_zero_warn(f"NegativeTransferMonitor: {self._no_plots_note()}")

    @staticmethod
    def _no_plots_note() -> str:
        return (f"matplotlib is not installed, so no heatmap PNG is written; the report (JSON and Markdown) "
                f"and the logged scalars are. For the heatmaps: {PLOTS_HINT}")

    def _install_baselines(self, module: Any) -> None:
        """Merge ``baselines`` and ``baselines_file`` into the tasks' own baselines (which make the
        module log ``val/<task>/delta``); contradictory values are an error."""
        given = {t: dict(m) for t, m in self.baselines.items()}
        if self.baselines_file:
            for task, metrics in load_baselines(self.baselines_file).items():
                given.setdefault(task, {}).update(metrics)
        unknown = sorted(set(given) - set(module.tasks))
        if unknown:
            raise ValueError(f"NegativeTransferMonitor: baselines name unknown task(s) {unknown}; the model's tasks are {module.task_names}.")
        for task_name, metrics in given.items():
            task = module.tasks[task_name]
            known = task.higher_is_better()
            bad = sorted(set(metrics) - set(known))
            if bad:
                raise ValueError(f"NegativeTransferMonitor: baselines for task '{task_name}' name unknown metric(s) {bad}; its metrics are {sorted(known)}.")
            for metric, value in metrics.items():
                if metric in task.baselines and not math.isclose(task.baselines[metric], value):
                    raise ValueError(
                        f"NegativeTransferMonitor: task '{task_name}' metric '{metric}' has baseline {task.baselines[metric]} "
                        f"in its task config but {value} in the monitor's baselines; keep one."
                    )
                if value == 0:
                    raise ValueError(f"NegativeTransferMonitor: baseline 0 for task '{task_name}' metric '{metric}' makes Δ undefined.")
                task.baselines[metric] = value

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.output_dir is not None:
            self._resolved_dir = self.output_dir
            return
        log_dir = trainer.log_dir  # broadcasts: must run on every rank
        checkpoint = trainer.checkpoint_callback
        base = getattr(checkpoint, "dirpath", None) or log_dir or trainer.default_root_dir
        self._resolved_dir = os.path.join(base, "negative_transfer")

    # ------------------------------------------------------------------ measurement
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_measured_step or step == 0 or step % self.interval != 0:
            return
        self._last_measured_step = step
        signals = self.measure(trainer, pl_module, batch)
        self._record(signals)
        pl_module.log_dict(self._scalars(signals), on_step=True, on_epoch=False)
        self._apply_harm_rule(trainer, pl_module)

    def _task_losses(self, module: Any, batch: Mapping[str, Any], device: torch.device) -> tuple[list[Optional[Tensor]], Tensor]:
        """Each task's loss through the module's own loss path, as the task would act (no loss
        multiplier, no detach; any batch layout the module reads), and which tasks are present."""
        losses = module.compute_losses(batch, "monitor")[2]
        values = [losses[n].float() if n in losses else None for n in self.task_names]
        return values, torch.tensor([v is not None for v in values], device=device)

    def _mean_over_ranks(self, trainer: pl.Trainer, values: Tensor, present: Tensor) -> Tensor:
        """Mean of ``values`` (rows indexed by task) over the ranks where the task is present;
        rows present nowhere come out NaN. Identical on every rank."""
        weight = present.to(values).reshape(-1, *([1] * (values.ndim - 1)))
        total, count = values * weight, present.to(values)
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(torch.cat([total.flatten(), count]), reduce_op="sum")
            total, count = packed[: total.numel()].view_as(total), packed[total.numel():]
        count = count.reshape(-1, *([1] * (values.ndim - 1)))
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))

    def measure(self, trainer: pl.Trainer, module: Any, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """All per-step signals on ``batch``: base losses, Jacobian geometry, lookahead affinity."""
        named = module.named_shared_parameters()  # what the architecture shares, names relative to the encoder
        params = [p for _, p in named]
        num_tasks = len(self.task_names)
        device = params[0].device
        with _eval_mode(module), trainer.precision_plugin.forward_context():
            with torch.enable_grad():
                losses, present = self._task_losses(module, batch, device)
                rows = [i for i in range(num_tasks) if losses[i] is not None]
                per_param = task_jacobian([l for l in losses if l is not None], params, batched=self.batched_jacobian, retain_graph=False)
            local = torch.zeros(num_tasks, sum(p.numel() for p in params), device=device, dtype=torch.float32)
            local[rows] = flatten_jacobian(per_param).float()
            base_local = torch.stack([l.detach() if l is not None else torch.zeros((), device=device) for l in losses])
            jacobian = self._mean_over_ranks(trainer, local, present)
            stepped = ~jacobian[:, 0].isnan()
            stepped_list = stepped.tolist()  # one host sync
            grads = list(torch.nan_to_num(jacobian).split([p.numel() for p in params], dim=1))
            grads = [g.reshape(num_tasks, *p.shape).to(p.dtype) for g, p in zip(grads, params)]
            # Row T: the zero gradient, i.e. the step the optimizer takes whatever the task (momentum,
            # weight decay). Each task's lookahead is compared with it, so Z isolates that task's own effect.
            with_reference = self.affinity_reference == "zero_gradient"
            if with_reference:
                grads = [torch.cat([g, torch.zeros_like(g[:1])]) for g in grads]
            updates, note = lookahead_updates(trainer.optimizers[0], params, grads)
            if note and note not in self.notes:
                self.notes.append(note)
                rank_zero_warn(f"NegativeTransferMonitor: {note}")
            lookahead = torch.zeros(num_tasks + 1, num_tasks, device=device)
            with torch.no_grad():
                # θ + Δθ_t in place (the module's own forward and loss path), restored bit for bit after.
                originals = [p.detach().clone() for p in params]
                try:
                    for i in range(num_tasks + with_reference):
                        if i < num_tasks and not stepped_list[i]:
                            continue
                        for p, p0, u in zip(params, originals, updates):
                            p.copy_(p0 + u[i])
                        moved, _ = self._task_losses(module, batch, device)
                        lookahead[i] = torch.stack([l if l is not None else torch.zeros((), device=device) for l in moved])
                finally:
                    for p, p0 in zip(params, originals):
                        p.copy_(p0)
        both = self._mean_over_ranks(trainer, torch.cat([base_local[None], lookahead]).T, present).T
        base, after = both[0], both[1:-1]
        reference = both[-1] if with_reference else base
        affinity = 1.0 - after / torch.where(reference > 0, reference, torch.full_like(reference, float("nan")))[None, :]
        affinity[~stepped] = float("nan")
        signals = {"losses": base, "affinity": affinity, **gradient_geometry(torch.nan_to_num(jacobian))}
        for key in ("cosine", "gms"):
            signals[key][~stepped] = float("nan")
            signals[key][:, ~stepped] = float("nan")
        signals["norms"][~stepped] = float("nan")
        if self.per_layer:
            signals.update(self._per_layer_cosine(jacobian, named))
        # One device-to-host copy for all signals.
        flat = torch.cat([v.detach().double().reshape(-1) for v in signals.values()]).cpu()
        parts = flat.split([v.numel() for v in signals.values()])
        return {k: part.view(v.shape) for (k, v), part in zip(signals.items(), parts)}

    def _per_layer_cosine(self, jacobian: Tensor, named: Sequence[tuple[str, Tensor]]) -> dict[str, Tensor]:
        layers: dict[str, list[int]] = {}
        start = 0
        for name, p in named:
            layer = name.rsplit(".", 1)[0] if "." in name else name
            layers.setdefault(layer, []).extend(range(start, start + p.numel()))
            start += p.numel()
        return {
            f"layer_cosine/{layer}": gradient_geometry(torch.nan_to_num(jacobian[:, cols]))["cosine"]
            for layer, cols in layers.items()
        }

    def _record(self, s: dict[str, Tensor]) -> None:
        self.measurements += 1
        cos_ok = s["cosine"].isfinite()
        self.cosine_sum += torch.nan_to_num(s["cosine"])
        self.gms_sum += torch.nan_to_num(s["gms"])
        self.cosine_count += cos_ok.double()
        self.conflict_count += (cos_ok & (s["cosine"] < 0)).double()
        norms_ok = s["norms"].isfinite()
        self.norm_sum += torch.nan_to_num(s["norms"])
        self.norm_count += norms_ok.double()
        aff_ok = s["affinity"].isfinite()
        self.affinity_sum += torch.nan_to_num(s["affinity"])
        self.affinity_count += aff_ok.double()
        self.recent_affinity.append(s["affinity"].clone())
        finite = torch.nan_to_num(s["affinity"])
        self.harm_sum += finite
        self.harm_sumsq += finite**2
        self.harm_count += aff_ok.double()

    def _scalars(self, s: dict[str, Tensor]) -> dict[str, float]:
        names = self.task_names
        out: dict[str, float] = {}
        rate = self.conflict_rate
        for i, a in enumerate(names):
            out[f"nt/grad_norm/{a}"] = float(s["norms"][i])
            out[f"nt/loss/{a}"] = float(s["losses"][i])
            for j, b in enumerate(names):
                if i == j:
                    continue
                out[f"nt/affinity/{a}->{b}"] = float(s["affinity"][i, j])
                if i < j:
                    out[f"nt/cosine/{a}~{b}"] = float(s["cosine"][i, j])
                    out[f"nt/gms/{a}~{b}"] = float(s["gms"][i, j])
                    out[f"nt/conflict_rate/{a}~{b}"] = float(rate[i, j])
                    for key, matrix in s.items():
                        if key.startswith("layer_cosine/"):
                            out[f"nt/cosine/{key.split('/', 1)[1]}/{a}~{b}"] = float(matrix[i, j])
        return {k: v for k, v in out.items() if math.isfinite(v)}

    # ------------------------------------------------------------------ rules
    def _t_statistics(self, mean: Tensor, var: Tensor, count: Tensor) -> dict[str, Tensor]:
        """t of every mean Z_{i→j} (NaN on the diagonal and below two values) and, per source, the
        largest over its targets (its least-hurt target; NaN if any target's t is undefined)."""
        t_stat = mean / (var.clamp_min(0).sqrt() / count.clamp_min(1).sqrt()).clamp_min(1e-30)
        eye = torch.eye(len(self.task_names), dtype=torch.bool)
        t_stat = t_stat.masked_fill((count < 2) | eye, float("nan"))
        least_hurt = t_stat.masked_fill(eye, -float("inf")).max(dim=1).values  # max propagates NaN
        own_progress = torch.diagonal(mean).clamp_min(0)  # what each target's own step achieves
        material = (mean < 0) & (-mean >= self.harm_min_fraction * own_progress[None, :])
        return {"mean": mean, "t_stat": t_stat, "least_hurt_t": least_hurt, "material": (material | eye).all(dim=1),
                "measurements": count.max()}

    def harm_statistics(self, span: str = "window") -> Optional[dict[str, Tensor]]:
        """The evidence of ``harms_others`` over ``span``: ``"window"`` (the last ``window``
        measurements) or ``"since_decision"`` (every measurement since the rule last flagged a task,
        or since the start). Returns the mean Z_{i→j} (T, T), its t-statistic across the
        measurements (T, T), each source's largest t over its targets (T,) and whether its harm is
        material for every target (T,); None while the span holds fewer than ``window`` measurements."""
        if span == "window":
            if len(self.recent_affinity) < self.window:
                return None
            stack = torch.stack(list(self.recent_affinity))  # (W, T, T)
            count = stack.isfinite().sum(0).double()
            mean = torch.nanmean(stack, dim=0)
            var = torch.nansum((stack - mean) ** 2, dim=0) / (count - 1).clamp_min(1)
            return self._t_statistics(mean, var, count)
        if span != "since_decision":
            raise ValueError(f"harm_statistics: span must be 'window' or 'since_decision', got {span!r}.")
        count = self.harm_count
        if float(count.max()) < self.window:
            return None
        mean = self.harm_sum / count.clamp_min(1)
        var = (self.harm_sumsq - count * mean**2) / (count - 1).clamp_min(1)
        return self._t_statistics(mean, var, count)

    def _apply_harm_rule(self, trainer: pl.Trainer, module: Any) -> None:
        candidates = []
        for span in ("window", "since_decision"):
            stats = self.harm_statistics(span)
            if stats is None:
                continue
            for i, name in enumerate(self.task_names):
                worst = float(stats["least_hurt_t"][i])
                significant = math.isfinite(worst) and worst < -self.harm_significance
                if significant and bool(stats["material"][i]) and not self._already_flagged(name, "harms_others"):
                    candidates.append((worst, i, span, stats))
        if not candidates:
            return
        t_stat, i, span, stats = min(candidates, key=lambda c: (c[0], c[1]))
        others = [(j, b) for j, b in enumerate(self.task_names) if j != i]
        evidence = {
            "least_hurt_t_statistic": t_stat,
            "affinity_given": {b: float(stats["mean"][i, j]) for j, b in others},
            "t_statistic": {b: float(stats["t_stat"][i, j]) for j, b in others},
            "fraction_of_own_progress_undone": {
                b: float(-stats["mean"][i, j] / stats["mean"][j, j]) if float(stats["mean"][j, j]) > 0 else None for j, b in others
            },
            "mean_cosine": {b: float(self.mean_cosine[i, j]) for j, b in others},
            "conflict_rate": {b: float(self.conflict_rate[i, j]) for j, b in others},
            "span": span,
            "measurements": int(stats["measurements"]),
        }
        self.recent_affinity.clear()
        for tensor in (self.harm_sum, self.harm_sumsq, self.harm_count):
            tensor.zero_()
        self._flag(trainer, module, self.task_names[i], "harms_others", evidence)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        losses = {t: float(metrics[f"val/{t}/loss"]) for t in self.task_names if f"val/{t}/loss" in metrics}
        deltas = {t: float(metrics[f"val/{t}/delta"]) for t in self.task_names if f"val/{t}/delta" in metrics}
        self.val_losses.append(losses)
        if deltas:
            self.val_deltas.append(deltas)
        self._apply_divergence_rule(trainer, pl_module)
        if self.delta_from_epoch is not None and trainer.current_epoch >= self.delta_from_epoch:
            self._apply_delta_rule(trainer, pl_module)

    def _apply_divergence_rule(self, trainer: pl.Trainer, module: Any) -> None:
        if len(self.val_losses) <= self.patience:
            return
        span = self.val_losses[-(self.patience + 1):]
        common = [t for t in self.task_names if all(t in h and h[t] > 0 for h in span)]
        for task in common:
            series = [h[task] for h in span]
            others = [o for o in common if o != task]
            if not others or self._already_flagged(task, "diverging_loss"):
                continue
            rising = all(b > a for a, b in zip(series, series[1:]))
            others_change = sum(math.log(span[-1][o] / span[0][o]) for o in others) / len(others)
            if rising and others_change < 0:
                self._flag(trainer, module, task, "diverging_loss", {
                    "val_losses": series,
                    "others_mean_log_change": others_change,
                    "validations": len(span),
                })

    def _apply_delta_rule(self, trainer: pl.Trainer, module: Any) -> None:
        if len(self.val_deltas) < self.patience:
            return
        span = self.val_deltas[-self.patience:]
        for task in self.task_names:
            values = [h.get(task) for h in span]
            series = [v for v in values if v is not None]
            if len(series) < len(values) or self._already_flagged(task, "negative_delta"):
                continue
            if all(v < -self.delta_tolerance for v in series):
                self._flag(trainer, module, task, "negative_delta", {"delta_percent": series, "tolerance": self.delta_tolerance})

    def _already_flagged(self, task: str, rule: str) -> bool:
        return any(f["task"] == task and f["rule"] == rule for f in self.flagged)

    # ------------------------------------------------------------------ actions
    def _flag(self, trainer: pl.Trainer, module: Any, task: str, rule: str, evidence: dict[str, Any]) -> None:
        if task in self.acted_on:
            action = "none (already acted on)"
        else:
            action = self.action
            self.acted_on.append(task)
            if action == "downweight":
                current = module.task_loss_multipliers.get(task, 1.0)
                module.set_task_loss_multiplier(task, current * self.downweight_factor)
            elif action == "detach":
                module.detach_task(task)
            elif action == "stop":
                trainer.should_stop = True
        entry = {"step": trainer.global_step, "epoch": trainer.current_epoch, "task": task, "rule": rule, "action": action, "evidence": evidence}
        self.flagged.append(entry)
        rank_zero_warn(
            f"NegativeTransferMonitor: task '{task}' flagged by rule '{rule}' at step {entry['step']} "
            f"(epoch {entry['epoch']}); action: {action}; evidence: {evidence}"
        )
        for logger in trainer.loggers:
            logger.log_metrics({f"nt/flag/{task}/{rule}": 1.0}, step=trainer.global_step)

    # ------------------------------------------------------------------ reporting
    def _heatmaps(self, trainer: pl.Trainer, tag: str) -> list[str]:
        if not trainer.is_global_zero or self.measurements == 0 or self._resolved_dir is None or self._plots is False:
            return []
        folder = os.path.join(self._resolved_dir, "heatmaps")
        try:
            paths = [
                self._heatmap_writer.save(self.mean_cosine, self.task_names, f"Gradient cosine ({tag})",
                             os.path.join(folder, f"cosine_{tag}.png"), "task j", "task i"),
                self._heatmap_writer.save(self.mean_affinity, self.task_names, f"Affinity Z(i→j) ({tag})",
                             os.path.join(folder, f"affinity_{tag}.png"), "target j (receives)", "source i (steps)"),
            ]
        except ImportError:  # found at set-up but not importable (a broken install): the report still gets written
            self._warn_no_plots()
            return []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="nt/heatmap/cosine", images=[paths[0]], step=trainer.global_step)
                logger.log_image(key="nt/heatmap/affinity", images=[paths[1]], step=trainer.global_step)
        return paths

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_every_n_epochs and (trainer.current_epoch + 1) % self.plot_every_n_epochs == 0:
            self._heatmaps(trainer, f"epoch{trainer.current_epoch}")

    def build_report(self, trainer: pl.Trainer) -> dict[str, Any]:
        """The end-of-training report as a JSON-ready dict."""
        names = self.task_names
        report: dict[str, Any] = {
            "tasks": names,
            "interval": self.interval,
            "affinity_reference": self.affinity_reference,
            "measurements": self.measurements,
            "global_step": trainer.global_step,
            "action": self.action,
            "affinity": self.mean_affinity.tolist(),
            "cosine": self.mean_cosine.tolist(),
            "gms": self._ratio(self.gms_sum, self.cosine_count).tolist(),
            "conflict_rate": self.conflict_rate.tolist(),
            "grad_norm": dict(zip(names, self._ratio(self.norm_sum, self.norm_count).tolist())),
            "flagged": list(self.flagged),
            "final_delta": dict(self.val_deltas[-1]) if self.val_deltas else {},
            "final_delta_victims": [t for t, v in (self.val_deltas[-1] if self.val_deltas else {}).items() if v < -self.delta_tolerance],
            "grouping": None,
            "notes": list(self.notes) + ([] if self._plots is not False else [self._no_plots_note()]),
        }
        if self.measurements == 0:
            report["grouping_note"] = "No measurement was taken (training shorter than `interval` steps)."
        elif len(names) > MAX_TASKS_EXHAUSTIVE:
            report["grouping_note"] = f"Skipped: more than {MAX_TASKS_EXHAUSTIVE} tasks."
        else:
            grouping = select_networks(self.mean_affinity, names, self.max_networks)
            report["grouping"] = {"groups": grouping.groups, "score": grouping.score, "received": grouping.received}
        return report

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        heatmaps = self._heatmaps(trainer, "final")  # first: the report notes a failure to draw
        report = self.build_report(trainer)
        self.report = report
        if not trainer.is_global_zero or self._resolved_dir is None:
            return
        json_path, md_path = write_report(report, self._resolved_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.summary["nt/flagged_tasks"] = sorted({f["task"] for f in self.flagged})
                if report["grouping"] is not None:
                    run.summary["nt/recommended_networks"] = [" + ".join(g) for g in report["grouping"]["groups"]]
                logger.log_table(
                    key="nt/affinity_matrix",
                    columns=["source \\ target", *self.task_names],
                    data=[[a, *row] for a, row in zip(self.task_names, report["affinity"])],
                )
                for path in (json_path, md_path, *heatmaps):
                    with open(path, "rb") as src, open(os.path.join(run.dir, os.path.basename(path)), "wb") as dst:
                        dst.write(src.read())
