"""The evaluation protocol of the NYUv2 / Cityscapes results of MTAN, CAGrad, Nash-MTL and FAMO:
each metric averaged over the last epochs' evaluations, and Δ computed from those averages."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl

from mtl_lightning.metrics.delta import delta_mtl


class LastEpochsAverage(pl.Callback):
    """Logs ``<prefix>/<task>/<metric>``, the mean of ``val/<task>/<metric>`` over the last ``epochs``
    validations of ``fit`` (fewer while fewer have run), and ``<prefix>/delta_m`` / ``<prefix>/delta_mtl``
    from those means where the tasks have baselines.

    "We report the test performance averaged over the last 10 epochs" (Nash-MTL's NYUv2 README; the
    reference code leaves the averaging to the user). In those benchmarks the validation split is the
    test set, so ``val_last10/…`` is the number their tables report. The history is checkpointed.

    Args:
        epochs: How many of the last validations to average.
        prefix: Prefix of the logged keys (default ``val_last<epochs>``).
    """

    def __init__(self, epochs: int = 10, prefix: str = "") -> None:
        if epochs < 1:
            raise ValueError(f"LastEpochsAverage: epochs must be >= 1, got {epochs}.")
        self.epochs = epochs
        self.prefix = prefix or f"val_last{epochs}"
        self.history: list[dict[str, dict[str, float]]] = []
        self._pending = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        tasks: Mapping[str, Any] = getattr(pl_module, "tasks", {})
        record: dict[str, dict[str, float]] = {}
        for name, task in tasks.items():
            values = {m: trainer.callback_metrics.get(f"val/{name}/{m}") for m in task.metric_specs()}
            present = {m: v for m, v in values.items() if v is not None}
            if len(present) == len(values):
                record[name] = {m: float(v) for m, v in present.items()}
        if record:
            self.history = (self.history + [record])[-self.epochs:]
            self._pending = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pending:
            return
        self._pending = False
        means = self.means()
        for task, metrics in means.items():
            for metric, value in metrics.items():
                pl_module.log(f"{self.prefix}/{task}/{metric}", value)
        tasks: Mapping[str, Any] = getattr(pl_module, "tasks", {})
        baselines = {n: t.baselines for n, t in tasks.items() if t.baselines and n in means}
        if baselines:
            delta = delta_mtl(means, baselines, {n: tasks[n].higher_is_better() for n in means})
            if delta is not None:
                pl_module.log(f"{self.prefix}/delta_m", delta.delta_m)
                pl_module.log(f"{self.prefix}/delta_mtl", delta.delta_mtl)

    def means(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: mean}}`` over the recorded validations that have the task."""
        out: dict[str, dict[str, float]] = {}
        for task in {t for record in self.history for t in record}:
            records = [r[task] for r in self.history if task in r]
            out[task] = {m: sum(r[m] for r in records) / len(records) for m in records[0]}
        return dict(sorted(out.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
