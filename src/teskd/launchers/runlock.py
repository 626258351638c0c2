"""Whether another process holds a run folder's writer lock (``RUN/.teskd.lock``), and who."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from teskd.engine.rundir import IN_USE, LOCK, _read_holder


def lock_holder(run_dir: Path) -> str | None:
    """``"pid N on HOST, started ..."`` while a writer holds the lock, else None. The probe takes the lock
    for an instant (non-blocking) and drops it; it never creates the file."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_pid(holder: str | None) -> int | None:
    if holder and holder.startswith("pid "):
        try:
            return int(holder.split()[1])
        except ValueError:
            return None
    return None


def refused_holder(log_text: str) -> str | None:
    """The holder named in a ``teskd train`` that the lock refused (the last lines of its log), else None."""
    for line in reversed(log_text.splitlines()[-20:]):
        if IN_USE in line:
            return line.split(IN_USE, 1)[1].split(")", 1)[0]
    return None
