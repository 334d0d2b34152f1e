"""Runs that fail safely: a stop signal ends a run with a resumable checkpoint, checkpoint files are
written atomically and never hold non-finite weights, and an unreadable checkpoint is reported by name.

``mtl-lightning`` adds :class:`FaultTolerance` to every run; add it to a Trainer's callbacks to get
the same behaviour from Python.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal
import sys
import uuid
import warnings
import zipfile
from types import FrameType
from typing import Any, Callable, Mapping, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_registry import _is_registry

#: Attribute set on an exception that ends a run for a known reason: the one message to print for it.
RUN_ERROR_ATTR = "_mtl_run_error"

#: Values of ``ckpt_path`` that Lightning resolves itself.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str, what: Optional[str] = None, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear ``ValueError`` naming the file when it
    is missing, empty, truncated or corrupt, or holds pickled objects other than tensors and plain
    values (those are never unpickled, so no code in the file runs).

    ``what`` prefixes the message (e.g. ``"init_from"``); ``mmap=True`` maps the tensors instead of
    reading them (a cheap check of a large file).
    """
    prefix = f"{what}: " if what else ""
    shown = _display(str(path))
    if not os.path.exists(path):
        raise ValueError(f"{prefix}no checkpoint file {shown!r} (no such file).")
    if os.path.isdir(path):
        raise ValueError(f"{prefix}{shown!r} is a folder, not a checkpoint file.")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{prefix}checkpoint {shown!r} is corrupt: the file is empty (0 bytes; a write that never finished?).")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ValueError(f"{prefix}checkpoint {shown!r} is corrupt: the file is truncated ({size} bytes; the zip archive "
                         "torch.save writes has lost its end, e.g. a copy or a write that did not finish).")
    reason = None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            reason = (f"it holds a pickled Python object ({found.group(1)}), not only tensors and plain values; it was "
                      "not unpickled (checkpoints are read with weights_only=True, so no code in the file ran)")
        else:
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            detail_text = detail.group(1).strip() if detail else _first_line(err)
            reason = f"the file is corrupt or not a checkpoint written by torch.save ({size} bytes; {detail_text})"
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        reason = f"the file is corrupt or truncated ({size} bytes; torch.load: {_first_line(err)})"
    # Raised outside the except block: the message is the whole story (no chained torch traceback).
    raise ValueError(f"{prefix}cannot read checkpoint {shown!r}: {reason}.")


def check_resume_checkpoint(path: str) -> None:
    """Fail early, naming the file, when ``ckpt_path`` is not a readable Lightning checkpoint.
    Lightning's special values (``last``, ``best``, ``hpc``, registry names) and URLs are left to it."""
    text = str(path)
    if text in _SPECIAL_CKPT_PATHS or _is_registry(text) or not _is_local_file_protocol(text):
        return
    checkpoint = read_checkpoint(text, mmap=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"{_display(text)!r} is not a Lightning checkpoint to resume from (it has no 'state_dict').")


# ---------------------------------------------------------------------------------------- writing
class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, quota, permissions…); the file it would have replaced
    is intact."""

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


class NonFiniteCheckpointError(ValueError):
    """A checkpoint was not written because a weight in it is NaN or infinite."""


def non_finite_entry(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor with a NaN or infinite value, or None."""
    names = [k for k, v in state_dict.items() if type(v) in (torch.Tensor, torch.nn.Parameter) and v.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(state_dict[k]).all().cpu() for k in names])
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0])]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` made safe for local files.

    * A checkpoint is written to a temporary file in its own folder, flushed to disk and renamed over
      the target (``os.replace``): a crash, a kill or a full disk never leaves a partial file under
      the checkpoint's name, and the file it replaces stays intact until the new one is complete.
      (Lightning writes through a temporary file in the system's temp folder, whose final move is a
      copy when that folder is on another disk.)
    * A checkpoint whose weights hold a NaN or infinite value is refused (:class:`NonFiniteCheckpointError`).
    * A failed write raises :class:`CheckpointWriteError` naming the checkpoint and its folder.
    * Reading uses ``weights_only=True`` and reports an unreadable file by name (:func:`read_checkpoint`).

    Remote paths (``s3://`` …) go to Lightning's implementation unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_saved: Optional[str] = None  #: the last checkpoint written
        self.last_saved_step: Optional[int] = None  #: its global step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = str(path)
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        bad = non_finite_entry(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"Refusing to write checkpoint {_display(path)}: '{bad}' holds NaN or infinite values "
                f"(step {checkpoint.get('global_step')}). {self._intact()}"
            )
        folder = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            try:
                os.remove(tmp)
            except OSError:
                pass
            reason = err.strerror or _first_line(err)
            raise CheckpointWriteError(
                err.errno or errno.EIO,
                f"Writing checkpoint {_display(path)} failed: {reason} (folder {_display(folder)}). "
                f"Nothing there was replaced. {self._intact()}",
                path,
            ) from err
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        self._sync_folder(folder)
        self.last_saved, self.last_saved_step = path, checkpoint.get("global_step")

    def _intact(self) -> str:
        if self.last_saved is None:
            return "No checkpoint of this run was written before."
        return f"The checkpoints written before are intact (the last one: {_display(self.last_saved)}, step {self.last_saved_step})."

    @staticmethod
    def _sync_folder(folder: str) -> None:
        """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if weights_only is False or not _is_local_file_protocol(str(path)) or not os.path.exists(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(str(path), map_location=map_location)


# ---------------------------------------------------------------------------------------- the callback
class FaultTolerance(Callback):
    """Makes a run stop, fail and checkpoint safely.

    * **Stop signals.** On SIGTERM (or SIGUSR1, unless something else handles it, such as Lightning's
      SLURM auto-requeue) the run finishes the current optimizer step (all its accumulated
      micro-batches), saves a resumable checkpoint ``last-stopped-step=<N>.ckpt`` in the run's
      checkpoint folder (``--ckpt_path last`` finds it too), prints one line saying where it is and
      how to resume, and exits with status 128 + the signal's number (143 for SIGTERM). Resuming from
      it continues exactly as the uninterrupted run.
    * **Atomic checkpoints.** The Trainer's checkpoint writer becomes :class:`AtomicCheckpointIO`
      (unless one other than Lightning's default was configured).
    * **Failures.** A non-finite loss, a refused or failed checkpoint write gets one message (naming
      the task and step, or the file and folder, and the last good checkpoint) that the
      ``mtl-lightning`` script prints instead of a traceback.
    """

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None  #: the stop signal received, if any
        self.stop_checkpoint: Optional[str] = None  #: where the stop checkpoint went
        self._trainer: Optional[Trainer] = None
        self._previous: dict[int, Any] = {}
        self._forwarded = False
        self._mid_accumulation = False
        self._step_at_batch_start = 0

    # -------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signal_name, self.stop_checkpoint = None, None
        self._forwarded = self._mid_accumulation = False
        strategy = trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning has registered its handlers by now (and restores the originals when the run ends).
        self._trainer = trainer
        self._previous = {}
        try:
            term = signal.getsignal(signal.SIGTERM)
            if callable(term):
                self._previous[signal.SIGTERM] = term
                signal.signal(signal.SIGTERM, self._on_signal)
                if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
                    signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = {}

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        # Lightning stops after the batch in which it is told to: while training, it is told at the end
        # of the batch that completes an optimizer step (on_train_batch_end); elsewhere (validation), now.
        trainer = self._trainer
        if (trainer is None or not trainer.training) and not self._mid_accumulation:
            self._forward(frame)

    def _forward(self, frame: Optional[FrameType]) -> None:
        """Hand the stop to Lightning's SIGTERM handling: it ends the run after the current batch."""
        if self._forwarded:
            return
        self._forwarded = True
        handler: Callable[..., Any] = self._previous.get(signal.SIGTERM, lambda *a: None)
        handler(signal.SIGTERM, frame)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A micro-batch that did not end an optimizer step leaves gradients a checkpoint cannot hold:
        # the stop waits for the step's last micro-batch.
        self._mid_accumulation = trainer.global_step == self._step_at_batch_start
        if self.signal_name is not None and not self._mid_accumulation:
            self._forward(None)

    # -------------------------------------------------------------- the end of a run
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._stopped(trainer, exception)
        elif isinstance(exception, (FloatingPointError, CheckpointWriteError, NonFiniteCheckpointError)):
            self._describe_failure(trainer, exception)

    def _checkpoint_dir(self, trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            return str(dirpath)
        from mtl_lightning.tracking import run_directory

        return os.path.join(run_directory(trainer), "checkpoints")

    def _stopped(self, trainer: Trainer, exception: SIGTERMException) -> None:
        name = self.signal_name or "SIGTERM"
        exception.code = 128 + int(getattr(signal, name))
        step, fitting = trainer.global_step, str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit"
        if not fitting:
            if trainer.is_global_zero:
                print(f"Stopped by {name}: nothing to save outside fit.", file=sys.stderr, flush=True)
            return
        path = os.path.join(self._checkpoint_dir(trainer), f"last-stopped-step={step}.ckpt")
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - the stop itself must go on
            if trainer.is_global_zero:
                print(f"Stopped by {name} after step {step}; its checkpoint could not be written: {_first_line(err, 400)}",
                      file=sys.stderr, flush=True)
            return
        self.stop_checkpoint = path
        if trainer.is_global_zero:
            shown = _display(path)
            print(f"Stopped by {name} after step {step} (epoch {trainer.current_epoch}): resumable checkpoint {shown}; "
                  f"resume with: mtl-lightning fit <the same options> --ckpt_path {shown}", file=sys.stderr, flush=True)

    def _describe_failure(self, trainer: Trainer, exception: BaseException) -> None:
        io = getattr(trainer.strategy, "checkpoint_io", None)
        last = getattr(io, "last_saved", None)
        message = _first_line(exception, 1000)
        if isinstance(exception, FloatingPointError):
            message += " The step was not applied; no checkpoint holds non-finite weights."
        if last is not None and not isinstance(exception, (CheckpointWriteError, NonFiniteCheckpointError)):
            message += (f"\nThe last checkpoint: {_display(last)} (step {getattr(io, 'last_saved_step', '?')}); "
                        f"resume with --ckpt_path {_display(last)}")
        setattr(exception, RUN_ERROR_ATTR, message)
