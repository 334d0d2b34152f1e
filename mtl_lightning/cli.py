"""``mtl-lightning fit|validate|test|predict --config experiments/….yaml`` (LightningCLI), and the
``mtl-lightning sweep`` / ``mtl-lightning results`` commands (:mod:`mtl_lightning.sweep`,
:mod:`mtl_lightning.results`)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, NoReturn, Optional

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mtl_lightning._trainer import trainer_callbacks
from mtl_lightning.fault_tolerance import RUN_ERROR_ATTR, FaultTolerance, check_resume_checkpoint, read_checkpoint
from mtl_lightning.models.module import MultiTaskModule
from mtl_lightning.summary import RunSummary
from mtl_lightning.tasks.task import TaskConfigError
from mtl_lightning.tracking import RunConfigCallback

#: Trainer flags that the MultiTaskModule implements itself (it drives optimization).
MODULE_OPTIMIZATION_FLAGS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "mtl_lightning.tracking.WandbLogger",
        "init_args": {"save_dir": "runs", "project": "mtl-lightning"},
    },
}

SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: Commands handled before LightningCLI: ``mtl-lightning <command> …`` runs ``<module>.main(…)``.
TOOL_COMMANDS = {"sweep": "mtl_lightning.sweep", "results": "mtl_lightning.results"}

#: Set to 1 (or pass ``--debug``) to get the full traceback of a configuration error.
TRACEBACK_ENV = "MTL_LIGHTNING_TRACEBACK"

#: Attribute set on an exception raised while building the run from its configuration.
_CONFIG_ERROR_ATTR = "_mtl_config_error"


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").lower() not in ("", "0", "false", "no")


class _NoAdvertisingTips(logging.Filter):
    """Drops Lightning's "💡 Tip: … try installing litlogger / litmodels" info records."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.getMessage()).lstrip().startswith("💡 Tip:")
        except Exception:  # noqa: BLE001
            return True


def silence_lightning_tips() -> None:
    """Lightning 2.6 logs advertisement tips through its rank-zero logger (``rank_zero_info``);
    a logging filter on that logger drops them (idempotent)."""
    names = ["lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"]
    loggers = [logging.getLogger(n) for n in names]
    try:
        from lightning_utilities.core import rank_zero as _rz

        loggers.append(_rz.log)
    except (ImportError, AttributeError):
        pass
    for logger in loggers:
        if not any(isinstance(f, _NoAdvertisingTips) for f in logger.filters):
            logger.addFilter(_NoAdvertisingTips())


class MTLArgumentParser(LightningArgumentParser):
    """Argument errors as two lines (the error and where to find the accepted options) instead of
    the full usage; ``MTL_LIGHTNING_TRACEBACK=1`` restores jsonargparse's behaviour."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True) or traceback_requested():
            super().error(message, ex)
        try:
            from jsonargparse._common import debug_mode_active

            if debug_mode_active():
                super().error(message, ex)
        except ImportError:
            pass
        self._logger.error(message)
        handler = getattr(self, "_error_handler", None)
        if callable(handler):
            handler(self, message)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message.rstrip()}\ntip: the accepted options: {prog} --help\n")
        sys.exit(2)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it, as Python displays them (``raise … from None`` ends the chain:
    that error is the one to show)."""
    out, seen = [err], {id(err)}
    while True:
        last = out[-1]
        nxt = last.__cause__ if last.__cause__ is not None or last.__suppress_context__ else last.__context__
        if nxt is None or id(nxt) in seen:
            return out
        out.append(nxt)
        seen.add(id(nxt))


def _locate(err: BaseException) -> tuple[Optional[str], Optional[str]]:
    """(option, class) being instantiated when ``err`` was raised, from the traceback's frames."""
    option = cls = None
    for exc in _chain(err):
        tb = exc.__traceback__
        while tb is not None:
            f_locals = tb.tb_frame.f_locals
            dest = getattr(f_locals.get("component"), "dest", None)
            if tb.tb_frame.f_code.co_name == "instantiate" and isinstance(dest, str):
                option = dest
            for name in ("class_type", "val_class"):
                value = f_locals.get(name)
                if isinstance(value, type) and not value.__module__.startswith("jsonargparse"):
                    cls = f"{value.__module__}.{value.__qualname__}"
            tb = tb.tb_next
    return option, cls


def _root_message(err: BaseException) -> str:
    root = _chain(err)[-1]
    text = str(root).strip() or type(root).__name__
    if type(root).__name__ not in ("ValueError", "MisconfigurationException"):
        text = f"{type(root).__name__}: {text}"
    return text


def config_error_message(err: BaseException) -> Optional[str]:
    """The one-paragraph message for an error raised while building a run, or None."""
    info = getattr(err, _CONFIG_ERROR_ATTR, None)
    if info is None:
        return None
    phase, option, cls = info
    where = []
    if option:
        where.append(f"--{option}")
    if cls:
        where.append(f"({cls})")
    head = f"error in {' '.join(where)}" if where else f"error during {phase}"
    if where and phase != "configuration":
        head += f" during {phase}"
    return f"{head}: {_root_message(err)}\ntip: set {TRACEBACK_ENV}=1 (or pass --debug) for the full traceback"


class MTLCLI(LightningCLI):
    """LightningCLI for a :class:`MultiTaskModule` and any ``LightningDataModule`` (by class_path).

    Several ``--config`` files merge in order, every option can be overridden on the command line
    (spelled out in full: abbreviations are rejected), and the Trainer's ``gradient_clip_val`` /
    ``gradient_clip_algorithm`` / ``accumulate_grad_batches`` are handed to the module, which applies
    them (the module drives optimization itself). Each run saves its resolved config in its own
    folder and ends with a :class:`~mtl_lightning.summary.RunSummary` (``run_summary=False``: none).
    Every Trainer gets :class:`~mtl_lightning.fault_tolerance.FaultTolerance` (graceful stop on
    SIGTERM / SIGUSR1, atomic checkpoints; ``fault_tolerance=False``: not added), and ``ckpt_path`` /
    ``model.init_from`` are checked to be readable checkpoints before anything runs.
    """

    def __init__(self, args: Optional[list[str]] = None, run: bool = True, run_summary: bool = True,
                 fault_tolerance: bool = True, **kwargs: Any) -> None:
        silence_lightning_tips()
        self.run_summary = run_summary
        self.fault_tolerance = fault_tolerance
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", MTLArgumentParser)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {"default_env": False})
        parser_kwargs.setdefault("allow_abbrev", False)
        for subcommand in SUBCOMMANDS:  # LightningCLI passes only these keys to the subcommand parsers
            parser_kwargs[subcommand] = {"allow_abbrev": False, **parser_kwargs.get(subcommand, {})}
        super().__init__(
            MultiTaskModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, model = config.get("trainer"), config.get("model")
        if trainer is None or model is None:
            return
        if self.subcommand == "fit":  # the model would read it only once the data is set up
            self._check_checkpoint("model.init_from", model.get("init_from"), lambda p: read_checkpoint(p, mmap=True))
        for flag in MODULE_OPTIMIZATION_FLAGS:
            value = trainer.get(flag)
            default = 1 if flag == "accumulate_grad_batches" else None
            if value is not None and value != default:
                model[flag] = value
                trainer[flag] = default

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            # Marked, not wrapped: callers of MTLCLI still get the original exception type.
            setattr(err, _CONFIG_ERROR_ATTR, ("configuration", *_locate(err)))
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer_callbacks(trainer)
        if self.run_summary and not any(isinstance(cb, RunSummary) for cb in callbacks):
            callbacks.append(RunSummary())
        if self.fault_tolerance and not any(isinstance(cb, FaultTolerance) for cb in callbacks):
            callbacks.append(FaultTolerance())
        return trainer

    @staticmethod
    def _check_checkpoint(option: str, path: Any, check: Any) -> None:
        if not path:
            return
        try:
            check(path)
        except ValueError as err:
            setattr(err, _CONFIG_ERROR_ATTR, ("configuration", option, None))
            raise

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here: first make sure it is a readable checkpoint.
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._check_checkpoint("ckpt_path", self.config[subcommand].get("ckpt_path"), check_resume_checkpoint)
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ValueError as err:
            # A ValueError before the stage started (datamodule/module set-up) is an input error; so is a
            # TaskConfigError whenever it comes (a task that does not fit its data or its head, found at
            # the first batch: e.g. a head built for another input size).
            summary = next((cb for cb in trainer_callbacks(self.trainer) if isinstance(cb, RunSummary)), None)
            started = summary is None or summary.started
            if not started or isinstance(err, TaskConfigError):
                setattr(err, _CONFIG_ERROR_ATTR, ("set-up" if not started else f"{subcommand}", None, None))
            raise


def main(args: Optional[list[str]] = None) -> None:
    """The ``mtl-lightning`` console script. A configuration error prints one message (exit status
    2), so does a run that fails for a known reason (a non-finite loss, a checkpoint that cannot be
    written; exit status 1); ``--debug`` or ``MTL_LIGHTNING_TRACEBACK=1`` gives the traceback instead.
    A run stopped by SIGTERM / SIGUSR1 exits with 128 + the signal's number."""
    argv = sys.argv if args is None else list(args)  # sys.argv edited in place: LightningCLI reads it
    rest = argv[1:] if args is None else argv
    if rest and rest[0] in TOOL_COMMANDS:
        import importlib

        importlib.import_module(TOOL_COMMANDS[rest[0]]).main(rest[1:])
        return
    if "--debug" in argv[1 if args is None else 0 :]:
        argv.remove("--debug")
        os.environ[TRACEBACK_ENV] = "1"
    # A deprecation inside Lightning 2.6 with torch >= 2.10 (lightning.pytorch.utilities._pytree), not ours.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning 2.6 warns that a step-triggered checkpoint holds the weights after the step: what resuming needs.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    try:
        MTLCLI(args=args if args is None else argv)
    except Exception as err:
        run_error = getattr(err, RUN_ERROR_ATTR, None)
        message = config_error_message(err)
        if traceback_requested() or (message is None and run_error is None):
            raise
        if message is None:
            message = f"error: {run_error}\ntip: set {TRACEBACK_ENV}=1 (or pass --debug) for the full traceback"
        sys.stderr.write(message + "\n")
        sys.exit(2 if run_error is None else 1)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # the run is complete: a later main() in this process starts a new one


if __name__ == "__main__":
    main()
