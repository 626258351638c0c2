"""Checkpoint files: written atomically, read without executing code from the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from teskd.errors import TeskdError


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous checkpoint untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TeskdError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TeskdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, disallowed pickled objects...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeskdError(f"checkpoint {path} is corrupt or not a teskd checkpoint ({detail[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise TeskdError(f"checkpoint {path} is not a teskd checkpoint (missing model/config)")
    return state
