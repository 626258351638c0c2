"""Listing an image folder that a stranger made: class folders, and the image files under each.

``os.walk`` would follow a class folder linked to ``/`` through the whole machine, and a link loop inside a
class folder (``ln -s . loop``) would list its images again at every level. This walk

- visits every directory once, by ``(st_dev, st_ino)``: a link to a folder already listed is skipped, and
  said once (a warning), so a class is never counted twice;
- refuses a link to a folder that holds the data set itself (``/``, the home folder, the data root), at once;
- stops with one line when a split passes :data:`MAX_ENTRIES` entries or :data:`MAX_DEPTH` levels, which no
  image data set reaches: a class folder linked to the wrong place then costs seconds, not hours;
- skips hidden names (``.ipynb_checkpoints``, ``.DS_Store``), for classes and for files alike.

Class folders may themselves be links to folders elsewhere (users do that). Files are told from folders by
what ``scandir`` already knows (the directory entry's type): one ``stat`` per directory, none per file. A
non-directory entry with an image suffix is listed whatever it is (a FIFO, a dangling link): reading it then
fails as a bad image, named, rather than the file silently disappearing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from teskd.errors import TeskdError, printable
from teskd.log import log

MAX_ENTRIES = 20_000_000  # ImageNet-21k has 14 million images; 20 million entries in one split is a wrong link
MAX_DEPTH = 32  # levels below the split folder (a class folder is level 1)


def _reason(exc: OSError) -> str:
    return " ".join(str(exc.strerror or exc).split())


def _visible(name: str) -> bool:
    return not name.startswith(".")


def class_folders(folder: str) -> list[str]:
    """The names of ``folder``'s subfolders (or links to folders), hidden ones left out, in sorted order.
    OSError (the folder is missing or unreadable) is the caller's to report."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _visible(e.name) and e.is_dir())


@dataclass
class Listing:
    """The image files of a split, relative to its folder, in class order, and the links skipped as repeats."""

    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    repeats: list[tuple[str, str]] = field(default_factory=list)  # (link, the folder it repeats), both relative


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestors(folder: str) -> dict[tuple[int, int], str]:
    """The folders that contain ``folder``, as given and after resolving links: walking one of them would walk
    the data set itself, and whatever else is beside it."""
    found = {}
    for start in (os.path.abspath(folder), os.path.realpath(folder)):
        path = start
        while True:
            try:
                found.setdefault(_key(path), path)
            except OSError:
                pass
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return found


class _Walk:
    def __init__(self, folder: str, suffixes: tuple[str, ...]):
        self.folder, self.suffixes = folder, suffixes
        self.ancestors = _ancestors(folder)
        self.seen: dict[tuple[int, int], str] = {}  # directory -> the relative path it was first listed under
        self.entries = 0
        self.listing = Listing()

    def _path(self, rel: str) -> str:
        return os.path.join(self.folder, rel)

    def _too_big(self, cls: str, what: str) -> TeskdError:
        return TeskdError(f"listing {printable(self._path(cls))} passed {what}, more than any image data set has; "
                          f"class folder {printable(cls)} (or a folder in it) may be linked to the wrong place")

    def _scan(self, rel: str, cls: str) -> tuple[list[str], list[str]]:
        """One directory's image file names and subfolder names, sorted, hidden ones left out."""
        files, dirs = [], []
        try:
            with os.scandir(self._path(rel)) as entries:
                for entry in entries:
                    self.entries += 1
                    if self.entries > MAX_ENTRIES:
                        raise self._too_big(cls, f"{MAX_ENTRIES:,} entries")
                    name = entry.name
                    if not _visible(name):
                        continue
                    if entry.is_dir():
                        dirs.append(name)
                    elif name.lower().endswith(self.suffixes):
                        files.append(name)
        except OSError as exc:
            raise TeskdError(f"cannot list {printable(self._path(rel))} ({_reason(exc)})") from exc
        return sorted(files), sorted(dirs)

    def class_files(self, cls: str) -> list[str]:
        """The image files under class folder ``cls``, relative to the split folder, in the order torchvision's
        ``make_dataset`` gives (directories by path, then files by name)."""
        path = self._path(cls)
        try:
            key = _key(path)
        except OSError as exc:
            raise TeskdError(f"cannot list {printable(path)} ({_reason(exc)})") from exc
        if key in self.ancestors:
            raise TeskdError(f"class folder {printable(path)} is {printable(self.ancestors[key])}, a folder that holds "
                             f"the data set itself: it is linked to the wrong place")
        if key in self.seen:
            raise TeskdError(f"class folders {printable(self._path(self.seen[key]))} and {printable(path)} are the "
                             f"same folder (a link): each class needs its own folder of images")
        self.seen[key] = cls
        found: list[tuple[str, list[str]]] = []
        stack = [(cls, 1)]
        while stack:
            rel, depth = stack.pop()
            files, dirs = self._scan(rel, cls)
            found.append((rel, files))
            below = []
            for name in dirs:
                sub = os.path.join(rel, name)
                try:
                    key = _key(self._path(sub))
                except OSError:  # vanished, or a link that cannot be followed: nothing to list
                    continue
                first = self.seen.get(key) or self.ancestors.get(key)
                if first is not None:
                    self.listing.repeats.append((sub, first))
                    continue
                if depth + 1 > MAX_DEPTH:
                    raise self._too_big(cls, f"{MAX_DEPTH} levels of folders")
                self.seen[key] = sub
                below.append((sub, depth + 1))
            stack.extend(reversed(below))
        found.sort()
        return [os.path.join(rel, name) for rel, files in found for name in files]


def list_files(folder: str, classes: dict[str, int], suffixes: tuple[str, ...]) -> Listing:
    """The files under ``folder/<class>/`` (any depth) whose names end in one of ``suffixes`` (case-insensitive),
    labelled by ``classes`` (name -> label, walked in sorted name order). A class without files is an error;
    links skipped as repeats are warned about once."""
    walk = _Walk(folder, tuple(s.lower() for s in suffixes))
    listing, empty = walk.listing, []
    for cls in sorted(classes):
        files = walk.class_files(cls)
        if not files:
            empty.append(cls)
        listing.names += files
        listing.labels += [classes[cls]] * len(files)
    if empty:
        shown = ", ".join(printable(c) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise TeskdError(f"{printable(folder)}: no image files ({', '.join(suffixes)}) in {len(empty)} class "
                         f"folder(s) ({shown})")
    if listing.repeats:
        n, (link, first) = len(listing.repeats), listing.repeats[0]
        log.warning(f"warning: {printable(folder)}: skipped {n} link{'s' if n != 1 else ''} to folders listed "
                    f"already (the first: {printable(link)}, the same folder as {printable(first)}); their images "
                    f"are listed once")
    return listing
