"""The run directory: its layout (known in this one place), its writer lock, and what may be replaced.

Layout::

    config.yaml            fully resolved config (absolute data.root: usable from any directory)
    metrics.jsonl          one JSON object per finished epoch
    checkpoints/last.pt    written atomically after every epoch (and every N steps); .sha256 beside it
    checkpoints/last.prev.pt   the previous last.pt, kept until the next save
    checkpoints/best.pt    the epoch with the best deployed top-1 on val (or test without val)
    deployed.safetensors   the deployable network only (written at the end; teacher.safetensors in runs
                           written before the rename, still found by deployed_file)
    summary.json           headline numbers (written at the end)
    curves.png             test top-1 per branch and the loss parts per epoch (written at the end)
    tensorboard/events.out.tfevents.*   with train.tensorboard=true: the epoch records as TensorBoard events
    .teskd.lock            held (flock) by the one process writing the run

Only files teskd writes are ever removed: ``--overwrite`` refuses a folder holding anything
else, and a run's own temporary files are removed only by the process holding its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from teskd import fileio
from teskd.errors import TeskdError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
DEPLOYED = "deployed.safetensors"
OLD_DEPLOYED = "teacher.safetensors"  # its name before the teacher -> deployed rename
CHECKPOINTS = "checkpoints"
LOCK = ".teskd.lock"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."  # the names TensorBoard's writer gives its files
_CHECKPOINT_FILES = ("last.pt", "last.prev.pt", "best.pt")
_TOP_FILES = (CONFIG, METRICS, SUMMARY, DEPLOYED, OLD_DEPLOYED, CURVES, LOCK)
_OWN_FOLDERS = (CHECKPOINTS, TENSORBOARD)


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    config = property(lambda self: self.path / CONFIG)
    metrics = property(lambda self: self.path / METRICS)
    summary = property(lambda self: self.path / SUMMARY)
    deployed = property(lambda self: self.path / DEPLOYED)  # where a run writes its export
    curves = property(lambda self: self.path / CURVES)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    last = property(lambda self: self.path / CHECKPOINTS / "last.pt")
    best = property(lambda self: self.path / CHECKPOINTS / "best.pt")
    lock_file = property(lambda self: self.path / LOCK)

    def deployed_file(self) -> Path | None:
        """The run's exported deployed network: deployed.safetensors, or teacher.safetensors in a run written
        before the rename; None when neither is there (the run has not finished)."""
        return next((p for p in (self.deployed, self.path / OLD_DEPLOYED) if p.is_file()), None)

    def has_checkpoint(self) -> bool:
        return any((self.checkpoints / name).is_file() for name in ("last.pt", "last.prev.pt"))

    # --- what belongs to a run ------------------------------------------------------------

    @staticmethod
    def _is_temp(name: str) -> bool:
        return name.startswith(".") and name.endswith(".tmp")

    def _is_own_top(self, entry: Path) -> bool:
        if entry.name in _OWN_FOLDERS:
            return entry.is_dir() and not entry.is_symlink()
        return entry.is_file() and not entry.is_symlink() and (entry.name in _TOP_FILES or self._is_temp(entry.name))

    @classmethod
    def _is_own_checkpoint_file(cls, entry: Path) -> bool:
        if not entry.is_file() or entry.is_symlink():
            return False
        name = entry.name
        return (name in _CHECKPOINT_FILES or (name.endswith(".sha256") and name[:-7] in _CHECKPOINT_FILES)
                or cls._is_temp(name))

    @staticmethod
    def _is_own_event_file(entry: Path) -> bool:
        return entry.name.startswith(EVENTS_PREFIX) and entry.is_file() and not entry.is_symlink()

    def foreign_entries(self) -> list[str]:
        """Names in the folder that a teskd run does not write (what ``--overwrite`` must not delete)."""
        if not self.path.is_dir():
            return []
        foreign = [e.name for e in sorted(self.path.iterdir()) if not self._is_own_top(e)]
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
            foreign += [f"{CHECKPOINTS}/{e.name}" for e in sorted(self.checkpoints.iterdir())
                        if not self._is_own_checkpoint_file(e)]
        if self.tensorboard.is_dir() and not self.tensorboard.is_symlink():
            foreign += [f"{TENSORBOARD}/{e.name}" for e in sorted(self.tensorboard.iterdir())
                        if not self._is_own_event_file(e)]
        return foreign

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def check_replaceable(self, overwrite: str = "--overwrite", out: str = "--out") -> None:
        """Raise unless ``--overwrite`` may replace this folder: a teskd run holding nothing else. ``overwrite``,
        ``out``: the options as the caller spells them (the Python API: ``overwrite``, ``out``)."""
        if self.is_empty():
            return
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise TeskdError(f"refusing to {overwrite} {self.path}: it is not a teskd run directory "
                             f"(it holds {shown}, which teskd did not write); choose another {out}")
        if not self.config.is_file():
            raise TeskdError(f"refusing to {overwrite} {self.path}: it has no {CONFIG}, so it is not a teskd run "
                             f"directory; choose another {out}")

    def clear(self) -> None:
        """Remove a previous run's files (caller holds the lock and has called ``check_replaceable``)."""
        for name in (SUMMARY, CURVES, DEPLOYED, OLD_DEPLOYED, METRICS, CONFIG):
            fileio.remove(self.path / name)
        if self.checkpoints.is_dir():
            for entry in self.checkpoints.iterdir():
                if self._is_own_checkpoint_file(entry):
                    fileio.remove(entry)
        if self.tensorboard.is_dir() and not self.tensorboard.is_symlink():
            for entry in self.tensorboard.iterdir():
                if self._is_own_event_file(entry):
                    fileio.remove(entry)
            with contextlib.suppress(OSError):  # left in place if anything else is (still) inside
                self.tensorboard.rmdir()
        self.remove_orphans()

    def remove_orphans(self) -> None:
        """Temporary files left by a killed writer (full-size checkpoints among them)."""
        for folder in (self.path, self.checkpoints):
            if folder.is_dir() and not folder.is_symlink():
                for entry in folder.iterdir():
                    if self._is_temp(entry.name) and entry.is_file() and not entry.is_symlink():
                        fileio.remove(entry)


# the refusal of a second writer; a sweep finds the holder after it in a refused run's log
IN_USE = "is in use by another teskd process ("

class RunLock:
    """An exclusive ``flock`` on ``RUN/.teskd.lock`` for the whole run.

    The kernel drops it when the process dies, so a killed run never leaves a stale lock;
    a second writer is refused with one line naming the holder.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.fd: int | None = None
        self.inode: int | None = None

    def __enter__(self) -> "RunLock":
        path = self.run.lock_file
        try:
            self.run.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TeskdError(f"cannot write to the run directory {self.run.path}: "
                             f"{fileio.describe_os_error(exc, self.run.path)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TeskdError(f"run directory {self.run.path} {IN_USE}{holder}); "
                                 f"wait for it to finish or stop it first") from exc
            raise TeskdError(f"cannot lock the run directory {self.run.path}: {exc.strerror or exc}") from exc
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock itself is what matters; the holder note is a courtesy
        self.fd, self.inode = fd, os.fstat(fd).st_ino
        return self

    def check(self) -> None:
        """Raise if the run folder was removed or moved while we hold it (never recreate it silently)."""
        try:
            same = os.stat(self.run.lock_file).st_ino == self.inode
        except OSError:
            same = False
        if not same:
            raise TeskdError(f"the run directory {self.run.path} was removed or moved while training; stopping "
                             f"(nothing was recreated)")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (removing it would race a new holder)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
