"""Experiment tracking: a W&B logger that never prompts, and the resolved config stored with each run."""

from __future__ import annotations

import netrc
import os
from typing import Any, Optional

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_available() -> bool:
    """True when W&B has an API key (environment variable or ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return os.path.isfile(path) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that works without an account or network.

    With ``offline=None`` (the default) it logs online when W&B credentials are present and
    otherwise writes an offline run under ``<save_dir>/wandb/offline-run-*`` — no prompt — that
    ``wandb sync <that folder>`` uploads later. ``WANDB_MODE`` in the environment takes precedence.
    """

    def __init__(self, *args: Any, offline: Optional[bool] = None, save_dir: str = "runs", project: str = "mtl-lightning", **kwargs: Any) -> None:
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not wandb_credentials_available()
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(*args, offline=offline, save_dir=save_dir, project=project, **kwargs)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}." if not prefix.endswith(".") and prefix else f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): config}


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved CLI config as ``config.yaml`` in the log dir (overwriting, so a second run
    in the same folder does not fail), records it as the run's hyperparameters in every logger,
    and stores a copy in the W&B run's files."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overwrite", True)
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(_flatten(config))
            if isinstance(logger, _LightningWandbLogger):
                run_dir = logger.experiment.dir
                with open(os.path.join(run_dir, "mtl_config.yaml"), "w") as f:
                    f.write(text)


def read_offline_run(run_file: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Read a W&B offline run file (``run-*.wandb``) without uploading it.

    Returns (history: ``{key: [values…]}`` in logging order, config: ``{key: value}``). Useful to
    inspect offline runs on a cluster node and in tests. Read a run of the same process after
    ``wandb.teardown()``, which waits for W&B's service to write out and close the file. The file is
    a LevelDB-style log of protobuf ``Record`` messages in 32 KiB blocks after a 7-byte header.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    with open(run_file, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file.")
    block, header, pos = 32768, 7, 7
    history: dict[str, list[float]] = {}
    config: dict[str, Any] = {}
    pending = b""
    while pos + header <= len(data):
        left_in_block = block - pos % block
        if left_in_block < header:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        kind_name = record.WhichOneof("record_type")
        if kind_name == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    history.setdefault(key, []).append(json.loads(item.value_json))
                except ValueError:
                    pass
        elif kind_name == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                try:
                    config[key] = json.loads(item.value_json)
                except ValueError:
                    config[key] = item.value_json
    return history, config
