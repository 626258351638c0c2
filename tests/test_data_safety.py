"""Loading untrusted data folders safely: restricted CIFAR unpickling, npz headers that lie,
empty splits, and the download mirror variable."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pathlib
import pickle
import shlex
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd.cli import main
from teskd.config import DataConfig
from teskd.data import cifar
from teskd.data.cifar import load_cifar
from teskd.data.pipeline import load_splits
from teskd.data.registry import get_dataset_spec
from teskd.errors import TeskdError

REPO = Path(__file__).resolve().parents[1]
NAMES100 = [f"class{i:02d}" for i in range(100)]


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _genuine(folder: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict:
    """A cifar-100-python folder of the official layout (hand-made), 3 train and 2 test images."""
    folder.mkdir(parents=True, exist_ok=True)
    train = {b"data": _rows(3, 0), b"fine_labels": [5, 0, 99], b"coarse_labels": [1, 0, 19],
             b"filenames": [b"a.png", b"b.png", b"c.png"], b"batch_label": b"training batch 1 of 1"}
    test = {b"data": _rows(2, 1), b"fine_labels": [7, 8], b"coarse_labels": [0, 0]}
    _dump(folder / "train", train, protocol)
    _dump(folder / "test", test, protocol)
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in NAMES100],
                            b"coarse_label_names": [b"c"] * 20}, protocol)
    return {"train": train, "test": test}


class _Payload:
    """Pickles as ``func(*args)``: what a tampered CIFAR file would carry."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, tuple[_Payload, str]]:
    """name -> (payload that would create ``marker``, the global the loader must name)."""
    payloads = {
        "os.system": _Payload(os.system, (f"touch {shlex.quote(str(marker))}",)),
        "open": _Payload(builtins.open, (str(marker), "w")),
        "Path.touch": _Payload(pathlib.Path.touch, (pathlib.Path(marker),)),
        "numpy.save": _Payload(np.save, (str(marker), np.zeros(1))),
    }
    # The name pickle records: posix.system, io.open, pathlib.Path.touch, numpy.save (on Linux, Python 3.11).
    return {k: (p, f"{p.func.__module__}.{p.func.__qualname__}") for k, p in payloads.items()}


def _evil_dict(payload) -> dict:
    # The payload sits inside an otherwise genuine-looking dict, as a tampered file would have it.
    return {b"data": _rows(1, 0), b"fine_labels": [0], b"batch_label": payload,
            b"fine_label_names": [b"x"] * 100}


# --- restricted unpickling -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["os.system", "open", "Path.touch", "numpy.save"])
@pytest.mark.parametrize("which", ["train", "test", "meta"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, which, kind):
    marker = tmp_path / "MARKER.npy"  # .npy so that np.save would write exactly this file
    folder = tmp_path / "data" / "cifar-100-python"
    _genuine(folder)
    payload, global_name = _payloads(marker)[kind]
    _dump(folder / which, _evil_dict(payload))

    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path / "data", train=(which != "test"))
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"refusing to load {folder / which}: it asks to import {global_name},")
    assert "official CIFAR pickle never does" in msg
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # nothing else was created either


def test_malicious_pickles_refused_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    payload, _ = _payloads(marker)["os.system"]
    for name in ("train", "test", "meta"):
        _dump(folder / name, _evil_dict(payload))

    code = main(["train", str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml"), f"data.root={tmp_path / 'data'}",
                 "train.epochs=1", "--out", str(tmp_path / "run")])
    assert code == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert f"refusing to load {folder / 'train'}: it asks to import {_payloads(marker)['os.system'][1]}," in err


def _raw_global_pickle(module: str, name: str) -> bytes:
    """A protocol-2 pickle that imports ``module.name`` (and stops): the refusal must come first."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."


@pytest.mark.parametrize("module, name", [
    ("numpy", "load"),
    ("numpy.testing", "assert_equal"),
    ("numpy._core.multiarray", "fromfile"),  # the module of an admitted global, another name
    ("numpy.core.multiarray", "fromfile"),
    ("numpy", "ndarray.tofile"),
    ("_codecs", "decode"),
])
def test_numpy_globals_that_cifar_does_not_need_are_refused(tmp_path, module, name):
    folder = tmp_path / "cifar-100-python"
    _genuine(folder)
    (folder / "train").write_bytes(_raw_global_pickle(module, name))
    with pytest.raises(TeskdError, match=rf"refusing to load .*train: it asks to import {module}\.{name},"):
        load_cifar("cifar100", tmp_path, train=True)


def test_codecs_encode_only_for_latin1(tmp_path):
    # Python 3 pickles bytes with protocol 2 as _codecs.encode(text, "latin1"); other codecs are refused.
    folder = tmp_path / "cifar-100-python"
    _genuine(folder)
    evil = (b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    (folder / "train").write_bytes(evil)
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path, train=True)
    msg = str(excinfo.value)
    assert msg.startswith(f"refusing to load {folder / 'train'}: it calls _codecs.encode with 'zlib', 'strict' "
                          f"instead of 'latin1', which an official CIFAR pickle never does")
    assert isinstance(excinfo.value.__cause__, pickle.UnpicklingError)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_layout_loads_with_exact_pixels(tmp_path, protocol):
    written = _genuine(tmp_path / "cifar-100-python", protocol)
    tr = load_cifar("cifar100", tmp_path, train=True)
    assert torch.equal(tr.images, torch.from_numpy(written["train"][b"data"].reshape(3, 3, 32, 32)))
    assert int(tr.images[2, 1, 4, 9]) == int(written["train"][b"data"][2, 1024 + 4 * 32 + 9])
    assert tr.labels.tolist() == [5, 0, 99]
    assert tr.classes == NAMES100
    te = load_cifar("cifar100", tmp_path, train=False)
    assert torch.equal(te.images.reshape(2, -1), torch.from_numpy(written["test"][b"data"]))


def test_numpy_scalar_labels_load(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _genuine(folder)
    _dump(folder / "test", {b"data": _rows(2, 5), b"fine_labels": [np.int64(3), np.int64(98)]})
    assert load_cifar("cifar100", tmp_path, train=False).labels.tolist() == [3, 98]


def _py2_string(data: bytes) -> bytes:
    """A Python 2 ``str`` the way Python 2 pickles it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """What the official files hold: protocol 2 by Python 2 with numpy 1.x, built opcode by opcode."""
    n = data.shape[0]
    out = b"\x80\x02}q\x00("  # PROTO 2, EMPTY_DICT, BINPUT, MARK
    out += _py2_string(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85" + _py2_string(b"b")
    out += b"\x87R("  # TUPLE3, REDUCE -> empty array; MARK of its state
    out += b"K\x01M" + struct.pack("<H", n) + b"M\x00\x0c\x86"  # 1, (n, 3072)
    out += b"cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
    out += b"(K\x03" + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # its state
    out += b"\x89" + _py2_string(data.tobytes()) + b"tb"  # False, the pixels; BUILD the array
    out += _py2_string(b"fine_labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += _py2_string(b"batch_label") + _py2_string(b"training batch 1 of 1")
    return out + b"u."


def test_python2_official_style_pickle_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _genuine(folder)
    data = _rows(4, 7)
    (folder / "train").write_bytes(_py2_cifar_pickle(data, [1, 2, 3, 99]))
    tr = load_cifar("cifar100", tmp_path, train=True)
    assert torch.equal(tr.images, torch.from_numpy(data.reshape(4, 3, 32, 32)))
    assert tr.labels.tolist() == [1, 2, 3, 99]


# --- npz whose header lies -------------------------------------------------------------------


def _npy_bytes(header_shape, body: bytes, dtype: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": header_shape})
    return buf.getvalue() + body


def _write_lying_npz(path: Path, member: str) -> None:
    y = io.BytesIO()
    np.save(y, np.zeros(1, np.int64))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, _npy_bytes((100_000_000_000, 32, 32, 3), bytes(3072)))  # claims 279 TiB
        zf.writestr("y.npy", y.getvalue())


@pytest.mark.parametrize("member", ["x.npy", "x"])
def test_npz_header_claiming_a_huge_array_is_refused(tmp_path, member):
    path = tmp_path / "train.npz"
    _write_lying_npz(path, member)
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path, train=True)
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: array x claims shape (100000000000, 32, 32, 3) of uint8 "
                          f"(307,200,000,000,000 bytes) but its member {member} holds only 3,072 bytes")


def test_npz_memory_error_is_a_clean_error(tmp_path, monkeypatch):
    path = tmp_path / "test.npz"
    np.savez(path, x=np.zeros((1, 32, 32, 3), np.uint8), y=np.zeros(1, np.int64))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 9 TiB")

    monkeypatch.setattr(np, "load", out_of_memory)
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path, train=False)
    assert str(excinfo.value) == (f"cannot read {path}: not enough memory to load it "
                                  f"(MemoryError: Unable to allocate 9 TiB)")
    assert isinstance(excinfo.value.__cause__, MemoryError)


# --- empty splits ------------------------------------------------------------------------------


def _npz_root(tmp_path: Path, train_labels, test_labels) -> Path:
    root = tmp_path / "npz"
    root.mkdir(parents=True)
    for name, labels in (("train.npz", train_labels), ("test.npz", test_labels)):
        np.savez(root / name, x=np.zeros((len(labels), 32, 32, 3), np.uint8),
                 y=np.asarray(labels, dtype=np.int64), classes=np.asarray(NAMES100))
    return root


def test_empty_test_split_fails_when_building_data(tmp_path):
    root = _npz_root(tmp_path, [0, 1], [])
    assert len(load_cifar("cifar100", root, train=False)) == 0  # loading alone is fine
    with pytest.raises(TeskdError) as excinfo:
        load_splits(DataConfig(dataset="cifar100", root=str(root)))
    assert str(excinfo.value) == (f"the test split of cifar100 at {root} holds 0 images; "
                                  f"evaluating the model needs at least one")


def test_val_split_taking_every_training_image_fails(tmp_path):
    root = _npz_root(tmp_path, [0, 1], [0])
    with pytest.raises(TeskdError, match=r"data\.val_per_class=1 holds out every training image"):
        load_splits(DataConfig(dataset="cifar100", root=str(root), val_per_class=1))
    # One image more per class leaves a training split and a non-empty validation split.
    root2 = _npz_root(tmp_path / "more", [0, 1, 0, 1], [0])
    _, train, val, test = load_splits(DataConfig(dataset="cifar100", root=str(root2), val_per_class=1))
    assert len(train) == 2 and len(val) == 2 and len(test) == 1


# --- download mirror -----------------------------------------------------------------------


def _mirror_archive(tmp_path: Path, name: str) -> tuple[Path, dict]:
    written = _genuine(tmp_path / "src" / "cifar-100-python")
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    return archive, written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_uses_the_mirror_variable(tmp_path, monkeypatch):
    archive, written = _mirror_archive(tmp_path, "mirror-copy.tar.gz")
    monkeypatch.setitem(cifar.URLS, "cifar100", (tmp_path / "not-there.tar.gz").as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", _md5(archive))
    monkeypatch.setenv("TESKD_CIFAR100_URL", archive.as_uri())
    root = tmp_path / "data"
    tr = load_cifar("cifar100", root, train=True, download=True)
    assert tr.labels.tolist() == [5, 0, 99]
    assert torch.equal(tr.images.reshape(3, -1), torch.from_numpy(written["train"][b"data"]))
    assert (root / "mirror-copy.tar.gz").is_file()


def test_mirror_download_is_still_checksummed(tmp_path, monkeypatch):
    archive, _ = _mirror_archive(tmp_path, "mirror-copy.tar.gz")
    monkeypatch.setitem(cifar.MD5S, "cifar100", "0" * 32)
    monkeypatch.setenv("TESKD_CIFAR100_URL", archive.as_uri())
    root = tmp_path / "data"
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", root, train=True, download=True)
    msg = str(excinfo.value)
    assert msg.startswith(f"checksum mismatch for {archive.as_uri()}: expected md5 {'0' * 32}, got {_md5(archive)}")
    assert not root.exists()  # the folder the download created is removed with the bad archive


def test_cifar10_mirror_variable_is_read(monkeypatch):
    monkeypatch.setenv("TESKD_CIFAR10_URL", "https://mirror.example/c10.tar.gz")
    monkeypatch.delenv("TESKD_CIFAR100_URL", raising=False)
    assert cifar._archive_url("cifar10") == "https://mirror.example/c10.tar.gz"
    assert cifar._archive_url("cifar100") == cifar.URLS["cifar100"]


# --- causes kept --------------------------------------------------------------------------------


def test_unknown_dataset_keeps_the_cause():
    with pytest.raises(TeskdError, match="unknown dataset 'mnist'") as excinfo:
        get_dataset_spec("mnist")
    assert isinstance(excinfo.value.__cause__, KeyError)


def test_md5_variable_replaces_the_official_digest(tmp_path, monkeypatch):
    archive, written = _mirror_archive(tmp_path, "own.tar.gz")
    monkeypatch.setenv("TESKD_CIFAR100_URL", archive.as_uri())
    monkeypatch.setenv("TESKD_CIFAR100_MD5", _md5(archive).upper())
    tr = load_cifar("cifar100", tmp_path / "data", train=True, download=True)
    assert torch.equal(tr.images.reshape(3, -1), torch.from_numpy(written["train"][b"data"]))
    monkeypatch.setenv("TESKD_CIFAR100_MD5", "not-a-digest")
    with pytest.raises(TeskdError, match="TESKD_CIFAR100_MD5='not-a-digest' is not an MD5 digest"):
        cifar._archive_md5("cifar100")
