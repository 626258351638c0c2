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
import secrets
import shutil
import stat
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


# Upper bounds on what teskd reads whole into memory. A file larger than its bound is refused in one line
# before a byte is read (a 20 GB sparse file takes no disk space, and a symlink to /dev/zero has no end).
MODEL_FILE_LIMIT = 4 << 30  # an exported network; a single-file ONNX cannot exceed 2 GiB (protobuf) anyway
RUN_FILE_LIMIT = 64 << 20  # config.yaml, summary.json, a digest file; metrics.jsonl of a very long run fits


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: Path, what: str, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (after symlinks) of at most ``limit`` bytes; anything else is a
    one-line TeskdError naming ``what`` it should have been. Opening never blocks: a FIFO is opened non-blocking
    and refused, so a named pipe in place of a run file or an image cannot hang teskd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TeskdError(f"cannot read {what} {path}: {describe_os_error(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TeskdError(f"cannot read {what} {path}: it is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise TeskdError(f"refusing to read {what} {path}: it is {st.st_size:,} bytes, more than a {what} can "
                             f"plausibly be ({limit:,})")
        chunks, size = [], 0
        while size <= limit:  # a file that grows while read stops at the limit too
            chunk = os.read(fd, min(1 << 24, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TeskdError(f"refusing to read {what} {path}: it grew past {limit:,} bytes while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise TeskdError(f"cannot read {what} {path}: {describe_os_error(exc)}") from exc
    finally:
        os.close(fd)


def read_text(path: Path, what: str, limit: int = RUN_FILE_LIMIT) -> str:
    """:func:`read_regular` decoded as UTF-8 (a decoding error is a one-line TeskdError too)."""
    try:
        return read_regular(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TeskdError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc


def read_bytes(path: Path, what: str, limit: int = MODEL_FILE_LIMIT) -> bytes:
    """The whole file (a model file: at most ``limit`` bytes), or a one-line TeskdError naming ``what``."""
    return read_regular(path, what, limit)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either its old or its new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # its own name: writers never share one
    try:
        fault_point("write", tmp)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except OSError as exc:
        reason = describe_os_error(exc, path)  # before the removal frees the space again
        Path(tmp).unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {reason}") from exc


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
