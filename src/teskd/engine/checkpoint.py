"""Checkpoint files: atomic, self-checking, read without executing code from the file.

Writing ``last.pt`` (each step is a single rename or a fresh file, see :mod:`teskd.fileio`):

1. the state is serialised to a temporary file in the same folder while its SHA-256 is
   computed, then flushed and fsynced;
2. the current ``last.pt`` becomes ``last.prev.pt``, then its digest file follows it;
3. the temporary file is renamed to ``last.pt`` and ``last.pt.sha256`` is written (atomically).

A digest file lists one or more accepted digests. ``last.pt`` and ``last.prev.pt`` form one
family: a file of the family is *verified* when its digest is listed by either digest file
of the family. With that rule a kill between any two operations above leaves at least one
verified checkpoint (between the two renames of step 2, ``last.prev.pt`` is vouched for by
``last.pt.sha256``). ``load_latest`` loads the newest verified file of the family.

``best.pt`` is not a second serialisation: after ``last.pt`` is complete it is published as a
hard link to (or copy of) that file, its digest file listing the old and the new digest
while the rename happens (:func:`publish_copy`).

Reading verifies the digest, then loads with ``torch.load(weights_only=True)`` and checks
that the fields a teskd checkpoint needs are there with sane values.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from teskd import fileio
from teskd.errors import TeskdError
from teskd.fileio import describe_os_error, file_digest
from teskd.log import log
from teskd.runfiles import read_digest_text


class _HashingWriter:
    """A file wrapper that hashes what is written through it (a kill point after the first write)."""

    def __init__(self, f, path: str):
        self.f = f
        self.path = path
        self.sha = hashlib.sha256()
        self.writes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        n = self.f.write(data)
        self.writes += 1
        if self.writes == 1:
            fileio.fault_point("write-partial", self.path)  # a kill here leaves a torn temporary file
        return n

    def flush(self) -> None:
        self.f.flush()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def temp_prefix(path: Path) -> str:
    """Temporary files of ``path`` are named ``.<name>.<random>.tmp`` (so a restart can find orphans)."""
    return f".{path.name}."


def read_digests(path: Path) -> list[str]:
    """The digests a digest file accepts (none when it is missing or unreadable: a FIFO, a device or an
    oversized file in its place is not read, so it vouches for nothing)."""
    try:
        text = read_digest_text(digest_path(path))
    except TeskdError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.split()]


def _write_digests(path: Path, digests: list[str]) -> None:
    fileio.atomic_write_text(digest_path(path), "".join(f"{d}  {path.name}\n" for d in digests))


def _serialise(state: dict[str, Any], path: Path) -> tuple[str, str]:
    """``state`` into a fresh fsynced temporary file beside ``path``; returns (temp path, sha256)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        fileio.fault_point("write", tmp)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f, tmp)
            torch.save(state, writer)
            f.flush()
            fileio.fault_point("fsync", tmp)
            os.fsync(f.fileno())
    except BaseException as exc:
        # torch reports a full disk as RuntimeError("... unexpected pos ..."), not as OSError: the free space is
        # read while the temporary file still fills the disk (once it is removed, megabytes may be free again)
        reason = describe_os_error(exc, path) if isinstance(exc, (OSError, RuntimeError)) else None
        Path(tmp).unlink(missing_ok=True)
        if reason is not None:
            raise TeskdError(f"could not write checkpoint {path}: {reason}; "
                             f"the previous checkpoint is unchanged") from exc
        raise
    return tmp, writer.sha.hexdigest()


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True,
                    create_parent: bool = True) -> str:
    """Write ``state`` to ``path`` (see the module docstring); returns its SHA-256.

    The trainer passes ``create_parent=False``: a run folder removed under a running job is an
    error, never silently recreated without its config.
    """
    path = Path(path)
    if create_parent:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TeskdError(f"cannot create {path.parent}: {describe_os_error(exc, path)}") from exc
    if not path.parent.is_dir():
        raise TeskdError(f"cannot save checkpoint {path}: the folder {path.parent} does not exist "
                         f"(was the run directory moved or deleted?)")
    tmp, digest = _serialise(state, path)

    def install():
        if keep_previous and path.exists():
            prev = previous_path(path)
            fileio.replace(path, prev)
            if digest_path(path).exists():
                fileio.replace(digest_path(path), digest_path(prev))
        fileio.replace(Path(tmp), path)
        _write_digests(path, [digest])

    _finish_write(install, Path(tmp), path)
    return digest


def _finish_write(steps, tmp: Path, path: Path) -> None:
    """Run the renames that install ``tmp`` as ``path``; an OS error becomes one line; ``tmp`` never stays."""
    try:
        steps()
        fileio.fsync_dir(path.parent)
    except OSError as exc:
        raise TeskdError(f"could not write checkpoint {path}: {describe_os_error(exc, path)}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def publish_copy(src: Path, src_digest: str, dst: Path) -> None:
    """Make ``dst`` a verified copy of the complete checkpoint ``src`` (used for ``best.pt``)."""
    old = read_digests(dst) if dst.exists() else []
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)  # mkstemp only reserves a unique name: the link must create it

    def install():
        _write_digests(dst, [*old, src_digest])  # old and new are both acceptable during the switch
        fileio.link_or_copy(src, Path(tmp))
        fileio.replace(Path(tmp), dst)
        _write_digests(dst, [src_digest])

    _finish_write(install, Path(tmp), dst)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, disallowed pickled objects...
        raise TeskdError(f"checkpoint {path} is corrupt or not a teskd checkpoint "
                         f"({_load_reason(exc)})") from exc


def _load_reason(exc: BaseException) -> str:
    """torch's first sentence about why a file did not load, minus its advice to unpickle anyway."""
    text = " ".join(str(exc).split())
    if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
        return "it holds Python objects other than tensors and plain data, which teskd never unpickles"
    if not text:
        return type(exc).__name__
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= 300 else first[:297] + "..."


_REQUIRED = {"model": dict, "config": dict}
_TRAINING = {"epoch": int, "num_classes": int}


def validate_state(state: Any, path: Path) -> dict[str, Any]:
    """Check the fields a teskd checkpoint must have, so that a hand-made file fails here in one line."""
    if not isinstance(state, dict):
        raise TeskdError(f"checkpoint {path} is not a teskd checkpoint (it holds a {type(state).__name__})")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise TeskdError(f"checkpoint {path} is not a teskd checkpoint (missing or bad {key!r})")
    if "optimizer" in state or "epoch" in state:  # a training checkpoint (not a bare weights file)
        for key, kind in _TRAINING.items():
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                raise TeskdError(f"checkpoint {path} is damaged or hand-made: {key!r} is missing or not an integer")
        if state["epoch"] < 0 or state["num_classes"] < 1:
            raise TeskdError(f"checkpoint {path} is damaged or hand-made: epoch {state['epoch']}, "
                             f"num_classes {state['num_classes']}")
    if "optimizer" in state:
        for key in ("rng", "best", "scaler"):
            if not isinstance(state.get(key), dict):
                raise TeskdError(f"checkpoint {path} is damaged or hand-made: {key!r} is missing")
        progress = state.get("progress")
        if progress is not None and not (isinstance(progress, dict) and isinstance(progress.get("step"), int)
                                         and progress["step"] >= 0):
            raise TeskdError(f"checkpoint {path} is damaged or hand-made: bad mid-epoch 'progress'")
    return state


def describe_weights(state: dict[str, Any]) -> str | None:
    """Where in training a checkpoint's weights come from, when that is the middle of an epoch (None after a whole
    one). Said by eval, export and predict: a run stopped inside its first epoch has ``epoch`` 0, and "epoch 0"
    alone hides that its weights are partly trained."""
    progress = state.get("progress")
    if not progress:
        return None
    steps = progress.get("steps") or 0  # unknown in checkpoints written before it was recorded
    batch = f"batch {progress['step']} of {steps}" if steps else f"after batch {progress['step']}"
    return f"weights from the middle of epoch {state['epoch'] + 1} ({batch}), partly trained"


def load_checkpoint(path: Path, accepted: list[str] | None = None) -> dict[str, Any]:
    """Load and verify one checkpoint file. ``accepted``: digests that vouch for it (default: its digest file's)."""
    path = Path(path)
    if not path.is_file():
        raise TeskdError(f"checkpoint not found: {path}")
    accepted = read_digests(path) if accepted is None else accepted
    if digest_path(path).exists() or accepted:
        if file_digest(path) not in accepted:
            raise TeskdError(f"checkpoint {path} fails its checksum ({digest_path(path).name}): "
                             f"it is truncated or damaged")
    return validate_state(_torch_load(path), path)


def state_mismatch(model_state: dict, weights: dict) -> str | None:
    """How ``weights`` differ from a module's state dict, in one line (the first few of each kind), or None."""
    missing = [k for k in model_state if k not in weights]
    unexpected = [k for k in weights if k not in model_state]
    shapes = [f"{k} (file {list(weights[k].shape)}, model {list(model_state[k].shape)})" for k in model_state
              if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != model_state[k].shape]

    def first(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    # integer weights (e.g. int8) would be cast silently into float parameters: garbage predictions, exit 0
    kinds = [f"{k} (file {weights[k].dtype}, model {model_state[k].dtype})" for k in model_state
             if k in weights and isinstance(weights[k], torch.Tensor)
             and weights[k].is_floating_point() != model_state[k].is_floating_point()]
    parts = [f"{label} {first(items)}" for label, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
              ("wrong number types", kinds)) if items]
    return "; ".join(parts) or None


def load_model_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(weights)``; a mismatch becomes a one-line error starting with ``what``."""
    problem = state_mismatch(module.state_dict(), weights)
    if problem:
        raise TeskdError(f"{what}: {problem}")
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise TeskdError(f"{what} ({' '.join(str(exc).split())[:300]})") from exc


def build_with_weights(build: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor],
                       what: str) -> torch.nn.Module:
    """``build()`` with ``weights`` loaded, built only once the weights are known to fit: first on the meta
    device (no memory), where keys, shapes and number types are compared. So a small file whose metadata
    claims a huge network (50 million classes, width x200) fails in one line before anything is allocated."""
    from teskd.models.meta_build import build_on_meta

    skeleton = build_on_meta(build)
    problem = state_mismatch(skeleton.state_dict(), weights)
    if problem:
        raise TeskdError(f"{what}: {problem}")
    module = build()
    load_model_weights(module, weights, what)
    return module


def load_latest(path: Path) -> tuple[dict[str, Any], Path]:
    """Load the newest verified checkpoint of ``path``'s family (``path``, then its kept predecessor).

    A file is verified when its digest is listed by the digest file of either member (see the
    module docstring). A lone file with no digest file anywhere (written before its digest
    file by a run killed at that moment, or by an older teskd) is loaded unverified; a file
    whose digest is listed nowhere while digest files exist is treated as damaged.
    """
    path = Path(path)
    prev = previous_path(path)
    family = [p for p in (path, prev) if p.is_file()]
    if not family:
        raise TeskdError(f"checkpoint not found: {path}")
    accepted = read_digests(path) + read_digests(prev)
    errors = []
    for candidate in family:
        try:
            if accepted or digest_path(candidate).exists():
                state = load_checkpoint(candidate, accepted)
            else:
                state = validate_state(_torch_load(candidate), candidate)
        except TeskdError as exc:
            errors.append(exc)
            continue
        if errors:
            log.warning(f"warning: {errors[0]}; using the previous checkpoint {candidate}")
        return state, candidate
    raise errors[0]
