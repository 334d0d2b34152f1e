"""LibMTL's evaluation protocol: Δp against the first epoch's results, the best epoch by Δp.

LibMTL (``LibMTL/_record.py`` of github.com/median-research-group/LibMTL) compares every epoch with a
``base_result``; when none is given (its NYUv2 and Cityscapes examples give none) that is the results
of the first epoch's evaluation. Its improvement Δp = (1/T) Σ_t (1/M_t) Σ_m (−1)^{l_m} (M − M_base)/M_base
(higher is better) is Maninis et al.'s Δ_MTL, logged here as ``val/delta_mtl``; the reported result is
the epoch with the best Δp, which a ``ModelCheckpoint(monitor="val/delta_mtl", mode="max")`` keeps.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch

from mtl_lightning.metrics.delta import delta_mtl


class FirstValidationBaselines(pl.Callback):
    """Sets the baselines of the tasks that have none to their metrics at the first validation of
    ``fit`` (LibMTL's ``base_result``), so Δ is logged from then on; checkpointed, so a resumed run or
    a ``test`` from a checkpoint compares with the same base.

    At that first validation the module has already logged its metrics, so this callback puts that
    epoch's ``val/delta_mtl`` / ``val/delta_m`` (0 for tasks measured against themselves) into the
    trainer's ``callback_metrics`` and its loggers; a ``ModelCheckpoint`` monitoring them runs after
    it (Lightning runs checkpoint callbacks last).

    Examples:
        >>> FirstValidationBaselines().baselines is None
        True
    """

    def __init__(self) -> None:
        self.baselines: Optional[dict[str, dict[str, float]]] = None

    def _apply(self, pl_module: pl.LightningModule) -> None:
        tasks: Mapping[str, Any] = getattr(pl_module, "tasks", {})
        for name, values in (self.baselines or {}).items():
            if name in tasks and not tasks[name].baselines:
                tasks[name].baselines = dict(values)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.baselines is not None:
            return
        tasks: Mapping[str, Any] = getattr(pl_module, "tasks", {})
        metrics = trainer.callback_metrics
        results: dict[str, dict[str, float]] = {}
        for name, task in tasks.items():
            values = {m: metrics.get(f"val/{name}/{m}") for m in task.metric_specs()}
            if all(v is not None for v in values.values()):
                results[name] = {m: float(v) for m, v in values.items() if v is not None}
        self.baselines = {n: v for n, v in results.items() if not tasks[n].baselines}
        if not self.baselines:
            return
        self._apply(pl_module)
        delta = delta_mtl(results, {n: t.baselines for n, t in tasks.items() if t.baselines},
                          {n: tasks[n].higher_is_better() for n in results})
        if delta is None:
            return
        logged = {"val/delta_mtl": delta.delta_mtl, "val/delta_m": delta.delta_m,
                  **{f"val/{n}/delta": v for n, v in delta.per_task.items()}}
        for key, value in logged.items():
            metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"baselines": self.baselines}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baselines = state_dict.get("baselines")
