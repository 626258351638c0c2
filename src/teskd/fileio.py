"""Small file helpers: digests, atomic writes, and the one place run files are written through.

Every write, rename and removal of a run's files goes through this module and first calls
:func:`fault_point`. In normal use that is a no-op; the crash-safety tests install a hook
there that kills the process at the N-th file operation, so every kill point of the
save/resume path is exercised in turn, not just random moments.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from teskd.errors import TeskdError

# Set by tests only: called as hook(operation, path) before each file operation.
fault_hook: Callable[[str, str], None] | None = None


def fault_point(op: str, path: str | os.PathLike) -> None:
    if fault_hook is not None:
        fault_hook(op, os.fspath(path))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (files may be several GB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_os_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """A short reason for a failed write; a full disk says so with the free space left."""
    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200] or type(exc).__name__
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and path is not None and disk_is_full(path)):
        reason = "No space left on device"
    return reason


def disk_is_full(path: str | os.PathLike, margin: int = 1 << 20) -> bool:
    """True when the filesystem holding ``path`` has less than ``margin`` bytes free."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(src: Path, dst: Path) -> None:
    fault_point("replace", dst)
    os.replace(src, dst)


def remove(path: Path) -> None:
    fault_point("remove", path)
    Path(path).unlink(missing_ok=True)


def read_bytes(path: Path, what: str) -> bytes:
    """The whole file, or a one-line TeskdError naming ``what`` it should have been."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TeskdError(f"cannot read {what} {path}: {describe_os_error(exc)}") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either its old or its new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fault_point("write", tmp)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {describe_os_error(exc, path)}") from exc


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write (a kill leaves at most a torn last line)."""
    try:
        fault_point("append", path)
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise TeskdError(f"could not write {path}: {describe_os_error(exc, path)}") from exc


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src`` (a hard link), or a copy where links are not supported.

    Files are only ever replaced by rename, never written in place, so sharing an inode is safe.
    """
    fault_point("link", dst)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST):
            raise
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
