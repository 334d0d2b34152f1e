"""Optional dependencies and local model folders: one clear error for each."""

from __future__ import annotations

import importlib
import os
from typing import Any


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError naming the mtl-lightning extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"'{module}' is not installed; it is the optional '{extra}' extra: pip install \"mtl-lightning[{extra}]\""
        ) from error


def check_model_dir(path: str, owner: str, option: str = "path", needs: tuple[str, ...] = ("config.json",)) -> str:
    """``path`` as a string, or a FileNotFoundError naming ``owner``'s ``option`` and what the folder must
    hold (one of ``needs``)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, name)) for name in needs):
        what = "a directory" if not os.path.isdir(path) else f"a directory with {' or '.join(needs)}"
        raise FileNotFoundError(
            f"{owner}: {option}={path!r} is not {what} (expected a model folder as written by save_pretrained). "
            "Nothing is downloaded at run time: fetch the model once where there is network access, e.g. "
            "huggingface_hub.snapshot_download(repo_id, local_dir=FOLDER), and point the config at FOLDER."
        )
    return path
