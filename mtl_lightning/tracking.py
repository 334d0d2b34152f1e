"""Experiment tracking: a W&B logger that never prompts and never kills a run, the run's folder, and
the resolved config stored with each run."""

from __future__ import annotations

import netrc
import os
import socket
import urllib.parse
import urllib.request
from typing import Any, Optional

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_credentials_available() -> bool:
    """True when W&B has an API key (environment variable or ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        host = (os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).split("://")[-1].rstrip("/")
        return os.path.isfile(path) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(base_url: str, timeout: float = 3.0) -> Optional[str]:
    """None when a TCP connection to the W&B server (or to the proxy in front of it) opens within
    ``timeout`` seconds, else a short reason. Cheap: no request is sent."""
    url = urllib.parse.urlsplit(base_url if "://" in base_url else f"https://{base_url}")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"bad WANDB_BASE_URL {base_url!r}"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            host, port = purl.hostname, purl.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err.strerror or type(err).__name__})"


def _display_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that works without an account or network and never kills a run.

    With ``offline=None`` (the default) it logs online when W&B credentials are present and
    otherwise writes an offline run under ``<save_dir>/wandb/offline-run-*`` — no prompt — that
    ``wandb sync <that folder>`` uploads later. ``WANDB_MODE`` in the environment takes precedence.

    Online, the server is probed first (a TCP connection, ``probe_timeout`` seconds) and
    ``wandb.init`` gets ``init_timeout`` seconds (unless ``WANDB_INIT_TIMEOUT`` says otherwise);
    if either fails the run goes offline. Whenever the run is offline one line says why, where the
    run is and the ``wandb sync`` command that uploads it.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        *,
        offline: Optional[bool] = None,
        save_dir: str = "runs",
        project: str = "mtl-lightning",
        init_timeout: float = 10.0,
        probe_timeout: float = 3.0,
        **kwargs: Any,
    ) -> None:
        if os.environ.get("WANDB_MODE") == "":  # an empty WANDB_MODE makes wandb fail its settings check
            del os.environ["WANDB_MODE"]
        self._offline_reason: Optional[str] = None
        if offline:
            self._offline_reason = "offline=True"
        elif offline is None:
            env_mode = os.environ.get("WANDB_MODE")
            if env_mode:
                if env_mode in ("offline", "dryrun"):
                    self._offline_reason = f"WANDB_MODE={env_mode}"
            elif not wandb_credentials_available():
                offline = True
                self._offline_reason = "no API key in WANDB_API_KEY or ~/.netrc"
        os.environ.setdefault("WANDB_SILENT", "true")
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(name=name, offline=bool(offline), save_dir=save_dir, project=project, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns about the setting even when None
            self._wandb_init.pop("anonymous", None)
        self.init_timeout = init_timeout
        self.probe_timeout = probe_timeout
        self.offline_dir: Optional[str] = None  #: the offline run's folder (what ``wandb sync`` takes)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._start_run()
        return self._experiment

    def _create(self, mode: Optional[str]) -> None:
        """Lightning's run creation, with the mode given to ``wandb.init`` instead of set in the
        process environment (so a fallback does not make later runs offline)."""
        offline = self._offline
        if mode is not None:
            self._wandb_init["mode"] = mode
        self._offline = False
        try:
            _LightningWandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
        finally:
            self._offline = offline

    def _start_run(self) -> None:
        import wandb

        if self._offline_reason is not None and self._offline:
            self._create("offline")
        elif os.environ.get("WANDB_MODE") or self._wandb_init.get("mode") in ("offline", "disabled"):
            self._create(None)
        else:
            base_url = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
            reason = server_reachable(base_url, self.probe_timeout) if wandb.run is None else None
            if reason is None:
                if "WANDB_INIT_TIMEOUT" not in os.environ:
                    settings = self._wandb_init.get("settings")
                    if settings is None:
                        self._wandb_init["settings"] = wandb.Settings(init_timeout=self.init_timeout)
                    elif isinstance(settings, dict):
                        settings.setdefault("init_timeout", self.init_timeout)
                try:
                    self._create(None)
                except Exception as err:  # noqa: BLE001 - any failure to reach W&B: go offline
                    self._experiment = None
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    reason = f"could not start the online run ({type(err).__name__}: {first[:120]})"
            if reason is not None:
                self._offline_reason = f"W&B server {base_url}: {reason}"
                self._create("offline")
        self._report_mode()

    def _report_mode(self) -> None:
        run = self._experiment
        if run is None or not hasattr(run, "settings"):
            return
        settings = run.settings
        if getattr(settings, "mode", None) in ("offline", "dryrun") or getattr(settings, "_offline", False):
            sync_dir = getattr(settings, "sync_dir", None) or os.path.dirname(run.dir)
            self.offline_dir = _display_path(sync_dir)
            reason = self._offline_reason or "offline mode"
            print(f"W&B offline ({reason}): run in {self.offline_dir}; upload it with: wandb sync {self.offline_dir}", flush=True)
        elif getattr(run, "url", None):
            print(f"W&B run: {run.url}", flush=True)

    def describe(self) -> Optional[str]:
        """One phrase for the run summary: the online run's URL or the offline run's folder."""
        if self._experiment is None:
            return None
        if self.offline_dir:
            return f"offline, {self.offline_dir} (upload: wandb sync {self.offline_dir})"
        return getattr(self._experiment, "url", None)


def run_directory(trainer: Trainer) -> str:
    """The run's own folder: where its checkpoints go (``<save_dir>/<name>/<version>`` of the first
    logger, as ``ModelCheckpoint`` resolves it) or ``default_root_dir`` without a logger. Rank zero."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, _LightningWandbLogger):
        _ = logger.experiment  # the run id is the version
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(save_dir, str(logger.name), version)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): config}


def _dump(parser: Any, config: Any) -> str:
    try:
        return parser.dump(config, skip_unset=False)
    except TypeError:  # jsonargparse < 4.49
        return parser.dump(config, skip_none=False)


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved CLI config as ``config.yaml`` in the run's own folder (next to its
    ``checkpoints/``; a run resumed into the same folder writes ``config-2.yaml``… instead of
    overwriting), records it as the run's hyperparameters in every logger, and stores a copy in the
    W&B run's files (``mtl_config.yaml``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overwrite", False)
        super().__init__(*args, **kwargs)
        self.config_path: Optional[str] = None  #: where the config was written (rank zero)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            text = _dump(self.parser, self.config)
            if self.save_to_log_dir:
                run_dir = run_directory(trainer)
                os.makedirs(run_dir, exist_ok=True)
                stem, ext = os.path.splitext(self.config_filename)
                path, n = os.path.join(run_dir, self.config_filename), 1
                while not self.overwrite and os.path.exists(path):
                    n += 1
                    path = os.path.join(run_dir, f"{stem}-{n}{ext}")
                with open(path, "w") as f:
                    f.write(text)
                self.config_path = path
            self._text = text
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = getattr(self, "_text", None) or _dump(self.parser, self.config)
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
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf class, no stub
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
