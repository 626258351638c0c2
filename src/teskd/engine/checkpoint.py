"""Checkpoint files: atomic, self-checking, read without executing code from the file.

Writing ``last.pt``:

1. the state is serialised to a temporary file in the same folder while its SHA-256 is
   computed, then flushed and fsynced;
2. the current ``last.pt`` (and its digest file) is kept as ``last.prev.pt``;
3. the temporary file is renamed to ``last.pt`` and ``last.pt.sha256`` is written (also
   atomically).

A crash, a kill or a full disk at any point leaves a loadable previous checkpoint. Reading
verifies the digest when the digest file is there, then loads with
``torch.load(weights_only=True)``. ``load_latest`` falls back to ``last.prev.pt`` when
``last.pt`` is missing, truncated or fails its checksum.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from teskd.errors import TeskdError
from teskd.fileio import file_digest


class _HashingWriter:
    """A file wrapper that hashes what is written through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
            if digest_path(path).exists():
                os.replace(digest_path(path), digest_path(previous_path(path)))
        os.replace(tmp, path)
        _atomic_write_text(digest_path(path), f"{writer.sha.hexdigest()}  {path.name}\n")
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TeskdError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                             f"the previous checkpoint is unchanged") from None
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TeskdError(f"checkpoint not found: {path}")
    recorded = digest_path(path)
    if recorded.is_file():
        expected = recorded.read_text().split()[0] if recorded.read_text().split() else ""
        if file_digest(path) != expected:
            raise TeskdError(f"checkpoint {path} fails its checksum ({recorded.name}): it is truncated or damaged")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, disallowed pickled objects...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeskdError(f"checkpoint {path} is corrupt or not a teskd checkpoint ({detail[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise TeskdError(f"checkpoint {path} is not a teskd checkpoint (missing model/config)")
    return state


def load_model_weights(method: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """``method.load_state_dict(weights)``; a mismatch becomes a one-line error starting with ``what``."""
    try:
        method.load_state_dict(weights)
    except RuntimeError as exc:
        raise TeskdError(f"{what} ({str(exc).splitlines()[0][:160]})") from None


def load_latest(path: Path) -> tuple[dict[str, Any], Path]:
    """Load ``path``, or its kept predecessor if ``path`` is damaged; say which was used."""
    path = Path(path)
    try:
        return load_checkpoint(path), path
    except TeskdError as exc:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except TeskdError:
            raise exc from None
        print(f"warning: {exc}; using the previous checkpoint {prev}", flush=True)
        return state, prev
