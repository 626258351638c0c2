"""CIFAR-10 / CIFAR-100: loading (official python pickles or an ``.npz`` layout), download, and
their registration as datasets."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pickle
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from teskd.data.arrays import ImageArrays
from teskd.data.registry import DatasetSpec, register_dataset
from teskd.errors import TeskdError, one_line

# Official archives; module-level so tests can point them at a local file:// archive. TESKD_<NAME>_URL
# names a mirror and TESKD_<NAME>_MD5 replaces the digest (see _archive_url, _archive_md5).
URLS: dict[str, str] = {
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}
MD5S: dict[str, str] = {
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar10": "c58f30108f718f92721af3b95e74349a",
}


@dataclass(frozen=True)
class _Format:
    num_classes: int
    folder: str  # the folder the official archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    listing: str  # the folder's files, for messages


_FORMATS = {
    "cifar100": _Format(100, "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names",
                         "{train,test,meta}"),
    "cifar10": _Format(10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                       "batches.meta", b"labels", b"label_names", "{data_batch_1..5,test_batch,batches.meta}"),
}

# Errors that mean "this file is damaged or is not what it claims to be".
_READ_ERRORS = (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, KeyError, OSError,
                TypeError, AttributeError, IndexError, zlib.error)

_IMAGE_SIZE = 32


@contextlib.contextmanager
def _reading(path: Path):
    """Turns the errors of reading a damaged file (or running out of memory) into a TeskdError."""
    try:
        yield
    except MemoryError as err:
        raise TeskdError(f"cannot read {path}: not enough memory to load it ({one_line(err)})") from err
    except _READ_ERRORS as err:
        raise TeskdError(f"cannot read {path}: the file is corrupt or truncated ({one_line(err)})") from err


def _format(name: str) -> _Format:
    if name not in _FORMATS:
        raise TeskdError(f"unknown CIFAR variant {name!r}; expected one of {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def _pickle_dir(fmt: _Format, root: Path) -> Path | None:
    """The folder holding the official pickles: ``root/<folder>`` or ``root`` itself."""
    names = (fmt.meta_file, *fmt.train_files, *fmt.test_files)
    for folder in (root / fmt.folder, root):
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    return None


def _has_npz(root: Path) -> bool:
    return (root / "train.npz").is_file() or (root / "test.npz").is_file()


# (3, 0), a 2.0 header in UTF-8, has no public reader in numpy.
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_npz_sizes(path: Path, keys: tuple[str, ...]) -> None:
    """Refuses an array whose header claims more data than its zip member holds: ``np.load``
    allocates the claimed array first, so a tiny crafted file could exhaust the memory."""
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: info for info in zf.infolist()}
        for key in keys:
            for name in (key, f"{key}.npy"):  # np.load looks the key up under both names
                info = members.get(name)
                if info is None:
                    continue
                with zf.open(info) as fp:
                    if fp.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                        continue  # not an array: np.load returns its bytes, rejected later
                    fp.seek(0)
                    version = np.lib.format.read_magic(fp)
                    if version not in _NPY_HEADER_READERS:
                        raise ValueError(f"{name}: unsupported .npy format version {version}")
                    shape, _, dtype = _NPY_HEADER_READERS[version](fp)
                    header_len = fp.tell()
                if dtype.hasobject:
                    continue  # np.load refuses object arrays (allow_pickle=False)
                claimed = math.prod(shape) * dtype.itemsize
                available = max(info.file_size - header_len, 0)
                if claimed > available:
                    raise TeskdError(f"{path}: array {key} claims shape {tuple(shape)} of {dtype} "
                                     f"({claimed:,} bytes) but its member {name} holds only {available:,} bytes "
                                     f"of data; the file is corrupt or was crafted")


def _read_npz(path: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    if not path.is_file():
        raise TeskdError(f"missing file {path} (found {path.with_name('test.npz' if train else 'train.npz')} but the "
                         f"{'training' if train else 'test'} split is needed too)")
    with _reading(path):
        _check_npz_sizes(path, ("x", "y", "classes"))
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise TeskdError(f"{path} has no array {' or '.join(map(repr, missing))} "
                                 f"(expected keys x: uint8 (N, 32, 32, 3), y: int64 (N,), classes)")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in z.files else None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE, 3):
        raise TeskdError(f"{path}: array x must be uint8 of shape (N, 32, 32, 3) (HWC), "
                         f"got {x.dtype} {tuple(x.shape)}")
    return x.transpose(0, 3, 1, 2), y, classes


def _numpy_global(submodule: str, name: str):
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (numpy 1)."""
    try:
        module = importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        module = importlib.import_module(f"numpy.core.{submodule}")
    return getattr(module, name)


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something an official CIFAR file never needs; the message says what."""


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stands in for ``_codecs.encode``, which Python 3 uses to pickle bytes with protocol < 3."""
    if encoding not in ("latin1", "latin-1") or errors != "strict" or not isinstance(text, str):
        shown = " ".join(f"{encoding!r}, {errors!r}".split())[:100]
        raise _Refused(f"it calls _codecs.encode with {shown} instead of 'latin1'")
    return text.encode("latin1")


# The only globals a CIFAR pickle may import: what numpy (1.x or 2.x) needs to rebuild arrays,
# dtypes and scalars. The official files (Python 2, protocol 2) use only _reconstruct, ndarray and
# dtype; scalar (numpy scalars, e.g. labels as np.int64), _frombuffer (arrays with protocol 5, the
# default from Python 3.14) and _codecs.encode (bytes in protocol < 3 from Python 3) let hand-made
# files of the same layout load. None of them can reach the file system, a shell or an import.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain Python values and numpy arrays, refusing every other global.

    Unpickling runs whatever callable a file names (a tampered file can ask for
    ``os.system``); every callable is looked up through :meth:`find_class`, so admitting
    only the numpy constructors in :data:`_ALLOWED_GLOBALS` keeps a file from running code.
    """

    def __init__(self, file):
        super().__init__(file, encoding="bytes")  # the official files were pickled by Python 2

    def find_class(self, module, name):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            shown = " ".join(f"{module}.{name}".split())[:200]
            raise _Refused(f"it asks to import {shown}")
        return make()

    def persistent_load(self, pid):
        raise _Refused("it uses a persistent id")


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise TeskdError(f"missing file {path} (the official CIFAR python folder {path.parent} is incomplete)")
    with _reading(path):
        try:
            with open(path, "rb") as f:
                obj = _CifarUnpickler(f).load()
        except _Refused as err:
            raise TeskdError(f"refusing to load {path}: {err}, which an official CIFAR pickle never does "
                             f"(only numpy arrays and plain Python values are allowed)") from err
    if not isinstance(obj, dict):
        raise TeskdError(f"{path} is not an official CIFAR pickle (expected a dict, got {type(obj).__name__})")
    return obj


def _entry(obj: dict, key: bytes, path: Path):
    for k in (key, key.decode()):
        if k in obj:
            return obj[k]
    raise TeskdError(f"{path} has no entry {key.decode()!r}; it is not an official CIFAR pickle of this variant")


def _read_pickles(fmt: _Format, folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels = [], []
    for name in fmt.train_files if train else fmt.test_files:
        path = folder / name
        obj = _load_pickle(path)
        data = np.asarray(_entry(obj, b"data", path))
        lab = np.asarray(_entry(obj, fmt.label_key, path))
        if data.ndim != 2 or data.shape[1] != 3 * _IMAGE_SIZE * _IMAGE_SIZE:
            raise TeskdError(f"{path}: 'data' must have shape (N, 3072), got {tuple(data.shape)}")
        if data.dtype != np.uint8:
            if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
                raise TeskdError(f"{path}: 'data' must hold uint8 pixel values, got {data.dtype}")
            data = data.astype(np.uint8)
        # Checked per file: totals that match could still pair images with another file's labels.
        if lab.ndim != 1 or lab.shape[0] != data.shape[0] or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
            raise TeskdError(f"{path}: {fmt.label_key.decode()!r} must be {data.shape[0]} integer labels, "
                             f"got {lab.dtype} {tuple(lab.shape)}")
        # Each row is the red plane, then green, then blue, each 32x32 row-major: CHW order.
        images.append(data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE))
        labels.append(lab.astype(np.int64))
    meta_path = folder / fmt.meta_file
    names = _entry(_load_pickle(meta_path), fmt.names_key, meta_path)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (TypeError, UnicodeDecodeError) as err:
        raise TeskdError(f"{meta_path}: cannot read the class names ({one_line(err)})") from err
    x = images[0] if len(images) == 1 else np.concatenate(images)  # no copy of CIFAR-100's single file
    y = labels[0] if len(labels) == 1 else np.concatenate(labels)
    return x, y, classes


def _fetch(url: str, md5: str, archive: Path, name: str) -> None:
    """Downloads ``url`` to ``archive`` and checks its MD5; a failed or bad download is deleted.
    (torchvision's ``download_url`` cannot read the file:// URLs of mirrors and tests.)"""
    from torchvision.datasets.utils import calculate_md5
    from tqdm import tqdm
    from tqdm.utils import CallbackIOWrapper

    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(archive, "wb") as out, \
                tqdm(total=int(resp.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=f"downloading {archive.name}", leave=False) as bar:
            shutil.copyfileobj(CallbackIOWrapper(bar.update, resp, "read"), out)
    except BaseException as err:
        archive.unlink(missing_ok=True)
        if isinstance(err, (OSError, ValueError)):  # urllib.error.URLError is an OSError
            raise TeskdError(f"could not download {url} ({one_line(err)}); set {_url_variable(name)} to a mirror "
                             f"of the archive you can reach, or download it by hand and extract it into "
                             f"{archive.parent}, or use a copy you have: TESKD_DATA=FOLDER reads FOLDER/{name}/ "
                             f"(train.npz and test.npz, or the extracted archive), data.root=FOLDER reads FOLDER "
                             f"itself") from err
        raise
    got = calculate_md5(archive)
    if got != md5:
        archive.unlink()
        raise TeskdError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the bad download was "
                         f"deleted, try again or download it by hand and extract it into {archive.parent}")


def _check_member(archive: Path, dest: Path, member: tarfile.TarInfo) -> None:
    """Refuses (before anything is written) a member that is not a plain file or folder inside ``dest``."""
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in PurePosixPath(name).parts or ":" in name:
        raise TeskdError(f"refusing to extract {archive}: member {name!r} has an unsafe path")
    if not (member.isfile() or member.isdir()):
        raise TeskdError(f"refusing to extract {archive}: member {name!r} is not a regular file or folder")
    target = (dest / name).resolve()
    if target != dest.resolve() and dest.resolve() not in target.parents:  # through a symlink already in dest
        raise TeskdError(f"refusing to extract {archive}: member {name!r} leaves {dest}")


# tarfile's "data" filter (Python >= 3.10.12 / 3.11.4) checks every member again while writing.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _safe_extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, dest, member)
            tar.extractall(dest, members=members, **_DATA_FILTER)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise TeskdError(f"cannot extract {archive}: the archive is corrupt or truncated ({one_line(err)}); "
                         f"delete it and download again") from err


def _url_variable(name: str) -> str:
    """The environment variable naming a mirror of ``name``'s archive."""
    return f"TESKD_{name.upper()}_URL"


def _archive_url(name: str) -> str:
    return os.environ.get(_url_variable(name), "").strip() or URLS[name]


def _archive_md5(name: str) -> str:
    """``$TESKD_<NAME>_MD5`` when set (a mirror's repackaged archive), else the official digest. The pickles
    are read by the restricted unpickler either way: a different archive can hold other data, not run code."""
    override = os.environ.get(f"TESKD_{name.upper()}_MD5", "").strip().lower()
    if override and (len(override) != 32 or any(c not in "0123456789abcdef" for c in override)):
        raise TeskdError(f"TESKD_{name.upper()}_MD5={override[:40]!r} is not an MD5 digest (32 hex digits)")
    return override or MD5S[name]


def download_cifar(name: str, root: str | os.PathLike) -> Path:
    """Downloads (if needed) and extracts the archive of ``name`` into ``root``; returns the archive."""
    from torchvision.datasets.utils import check_integrity

    _format(name)
    root = Path(root)
    url, md5 = _archive_url(name), _archive_md5(name)
    created = [p for p in (root, *root.parents) if not p.exists()]  # innermost first
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TeskdError(f"cannot create the data folder {root} ({one_line(err)})") from err
    archive_name = Path(urllib.parse.urlparse(url).path).name
    if archive_name in ("", ".", ".."):  # a mirror URL without a file name
        archive_name = Path(urllib.parse.urlparse(URLS[name]).path).name
    archive = root / archive_name
    try:
        if not check_integrity(archive, md5):
            archive.unlink(missing_ok=True)  # an interrupted or bad earlier download
            _fetch(url, md5, archive, name)
        _safe_extract(archive, root)
    except BaseException:
        # a failed download leaves no empty data/cifar100/ behind: the next run would find a folder and no data in
        # it, and `ls` would suggest a download had worked; a folder holding anything is kept
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return archive


def load_cifar(name: str, root: str | os.PathLike, train: bool, download: bool = False) -> ImageArrays:
    """Loads a CIFAR split as uint8 (N, 3, 32, 32) images and int64 labels from ``train.npz``/``test.npz``
    in ``root``, or the official extracted folder in ``root`` (or ``root`` itself), downloaded if asked."""
    fmt = _format(name)
    root = Path(os.path.expanduser(os.fspath(root)))
    if not _has_npz(root) and _pickle_dir(fmt, root) is None:
        if not download:
            where = f"in {root}" if root.is_dir() else f"at {root} (the folder does not exist)"
            raise TeskdError(f"no {name} data found {where}; expected either {root / 'train.npz'} and "
                             f"{root / 'test.npz'} (keys x, y, classes), or the official python version "
                             f"{root / fmt.folder}/{fmt.listing}; set data.download=true to download it, "
                             f"or point data.root at the data")
        download_cifar(name, root)
        if _pickle_dir(fmt, root) is None:
            raise TeskdError(f"the archive downloaded from {_archive_url(name)} does not contain "
                             f"{root / fmt.folder}")

    if _has_npz(root):
        source = root / ("train.npz" if train else "test.npz")
        x, y, classes = _read_npz(source, train)
    else:
        source = _pickle_dir(fmt, root)
        x, y, classes = _read_pickles(fmt, source, train)

    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise TeskdError(f"{source}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TeskdError(f"{source}: labels must be integers, got {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= fmt.num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise TeskdError(f"{source}: label {bad} is out of range for {name} (expected 0..{fmt.num_classes - 1})")
    classes = classes if classes is not None else [str(i) for i in range(fmt.num_classes)]
    if len(classes) != fmt.num_classes:
        raise TeskdError(f"{source}: {len(classes)} class names, expected {fmt.num_classes} for {name}")
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    return ImageArrays(images, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)), classes)


# The normalisation of the official TESKD code, used for both CIFAR variants.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)

register_dataset(DatasetSpec("cifar100", 100, _CIFAR_MEAN, _CIFAR_STD, _IMAGE_SIZE, partial(load_cifar, "cifar100")))
register_dataset(DatasetSpec("cifar10", 10, _CIFAR_MEAN, _CIFAR_STD, _IMAGE_SIZE, partial(load_cifar, "cifar10")))
