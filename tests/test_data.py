"""CIFAR loading (official pickles, npz, download), dataset registry and per-class splits."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd.data import cifar
from teskd.data.arrays import ImageArrays
from teskd.data import registry
from teskd.data.cifar import load_cifar
from teskd.data.registry import DatasetSpec, get_dataset_spec, register_dataset
from teskd.data.splits import first_k_per_class, split_val_per_class
from teskd.errors import TeskdError

from conftest import DATA_HINT, SHARED_CIFAR100 as REAL_CIFAR100  # $TESKD_DATA, then ../shared/data
NAMES100 = [f"class{i:02d}" for i in range(100)]
NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _rows(n: int, seed: int) -> np.ndarray:
    """(n, 3072) uint8 rows in the official CHW order, all different."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar100(root: Path, train_labels, test_labels, seed: int = 0) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = {b"data": _rows(len(train_labels), seed), b"fine_labels": list(train_labels),
             b"coarse_labels": [0] * len(train_labels), b"filenames": [b"x.png"] * len(train_labels)}
    test = {b"data": _rows(len(test_labels), seed + 1), b"fine_labels": list(test_labels),
            b"coarse_labels": [0] * len(test_labels)}
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in NAMES100],
                            b"coarse_label_names": [b"c"] * 20})
    return {"train": train, "test": test, "folder": folder}


def write_cifar10(root: Path, per_batch: int = 4) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i in range(1, 6):
        b = {b"data": _rows(per_batch, 10 + i), b"labels": [(i + j) % 10 for j in range(per_batch)]}
        _dump(folder / f"data_batch_{i}", b)
        batches.append(b)
    test = {b"data": _rows(3, 99), b"labels": [9, 0, 5]}
    _dump(folder / "test_batch", test)
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in NAMES10], b"num_cases_per_batch": 4})
    return {"batches": batches, "test": test, "folder": folder}


def write_npz(root: Path, name: str, x_hwc: np.ndarray, y, classes=NAMES100) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    np.savez(path, x=x_hwc, y=np.asarray(y, dtype=np.int64), classes=np.asarray(classes))
    return path


# --- official pickle layout -------------------------------------------------------------------


def test_cifar100_pickles_exact_pixels_labels_classes(tmp_path):
    written = write_cifar100(tmp_path, [2, 0, 1, 2, 0, 1], [1, 0, 2])
    # A known pixel: channel 1 (green), row 5, column 7 of image 3 is byte 1024 + 5*32 + 7 of its row.
    written["train"][b"data"][3, 1024 + 5 * 32 + 7] = 201
    _dump(written["folder"] / "train", written["train"])

    tr = load_cifar("cifar100", tmp_path, train=True)
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (6, 3, 32, 32)
    assert tr.images.is_contiguous()
    assert int(tr.images[3, 1, 5, 7]) == 201
    assert torch.equal(tr.images, torch.from_numpy(written["train"][b"data"].reshape(6, 3, 32, 32)))
    assert tr.labels.dtype == torch.int64 and tr.labels.tolist() == [2, 0, 1, 2, 0, 1]
    assert tr.classes == NAMES100

    te = load_cifar("cifar100", tmp_path, train=False)
    assert te.labels.tolist() == [1, 0, 2]
    assert torch.equal(te.images.reshape(3, -1), torch.from_numpy(written["test"][b"data"]))


def test_root_may_be_the_official_folder_itself(tmp_path):
    written = write_cifar100(tmp_path, [0, 1], [1])
    a = load_cifar("cifar100", written["folder"], train=True)
    b = load_cifar("cifar100", str(tmp_path), train=True)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cifar10_batches_concatenated_in_order(tmp_path):
    written = write_cifar10(tmp_path)
    tr = load_cifar("cifar10", tmp_path, train=True)
    assert tr.images.shape == (20, 3, 32, 32)
    expected = np.concatenate([b[b"data"] for b in written["batches"]]).reshape(20, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(expected))
    assert tr.labels.tolist() == [lab for b in written["batches"] for lab in b[b"labels"]]
    assert tr.classes == NAMES10
    te = load_cifar("cifar10", written["folder"], train=False)
    assert te.labels.tolist() == [9, 0, 5]
    # Pixel (c=2, h=31, w=0) of test image 1 is byte 2048 + 31*32 of its row.
    assert int(te.images[1, 2, 31, 0]) == int(written["test"][b"data"][1, 2048 + 31 * 32])


def test_cifar10_missing_batch_names_the_file(tmp_path):
    written = write_cifar10(tmp_path)
    (written["folder"] / "data_batch_3").unlink()
    with pytest.raises(TeskdError, match="data_batch_3"):
        load_cifar("cifar10", tmp_path, train=True)


# --- npz layout -------------------------------------------------------------------------------


def test_npz_hwc_converted_to_chw(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    x[2, 4, 9, 1] = 77  # h=4, w=9, channel 1
    write_npz(tmp_path, "train.npz", x, [0, 99, 5, 5, 1])
    write_npz(tmp_path, "test.npz", x[:2], [3, 4])
    tr = load_cifar("cifar100", tmp_path, train=True)
    assert int(tr.images[2, 1, 4, 9]) == 77
    assert torch.equal(tr.images, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert tr.images.is_contiguous()
    assert tr.labels.tolist() == [0, 99, 5, 5, 1]
    assert tr.classes == NAMES100
    assert load_cifar("cifar100", tmp_path, train=False).labels.tolist() == [3, 4]


def test_npz_preferred_and_missing_split_reported(tmp_path):
    x = np.zeros((2, 32, 32, 3), np.uint8)
    write_npz(tmp_path, "train.npz", x, [0, 1])
    with pytest.raises(TeskdError, match="test.npz"):
        load_cifar("cifar100", tmp_path, train=False)


def test_npz_wrong_shape(tmp_path):
    write_npz(tmp_path, "train.npz", np.zeros((2, 3, 32, 32), np.uint8), [0, 1])
    with pytest.raises(TeskdError, match=r"train\.npz.*\(N, 32, 32, 3\)"):
        load_cifar("cifar100", tmp_path, train=True)


def test_npz_length_mismatch(tmp_path):
    write_npz(tmp_path, "train.npz", np.zeros((3, 32, 32, 3), np.uint8), [0, 1])
    with pytest.raises(TeskdError, match="3 images"):
        load_cifar("cifar100", tmp_path, train=True)


# --- errors -------------------------------------------------------------------------------------


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_folder_message(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", root, train=True)
    msg = _one_line_error(excinfo)
    assert str(root) in msg and "does not exist" in msg
    assert "train.npz" in msg and "cifar-100-python" in msg and "data.download=true" in msg


def test_empty_folder_message_cifar10(tmp_path):
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar10", tmp_path, train=True)
    msg = _one_line_error(excinfo)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "data.download=true" in msg


def test_truncated_npz(tmp_path):
    path = write_npz(tmp_path, "train.npz", np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path, train=True)
    msg = _one_line_error(excinfo)
    assert str(path) in msg and "corrupt or truncated" in msg


def test_garbage_npz(tmp_path):
    (tmp_path / "train.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(TeskdError, match="train.npz"):
        load_cifar("cifar100", tmp_path, train=True)


@pytest.mark.parametrize("which", ["train", "meta"])
def test_truncated_pickle(tmp_path, which):
    written = write_cifar100(tmp_path, [0, 1, 2], [0])
    path = written["folder"] / which
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", tmp_path, train=True)
    msg = _one_line_error(excinfo)
    assert str(path) in msg and "corrupt or truncated" in msg


def test_pickle_without_labels(tmp_path):
    written = write_cifar100(tmp_path, [0, 1], [0])
    _dump(written["folder"] / "train", {b"data": _rows(2, 0)})
    with pytest.raises(TeskdError, match="fine_labels"):
        load_cifar("cifar100", tmp_path, train=True)


def test_pickle_wrong_row_length(tmp_path):
    written = write_cifar100(tmp_path, [0, 1], [0])
    _dump(written["folder"] / "train", {b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(TeskdError, match=r"\(N, 3072\)"):
        load_cifar("cifar100", tmp_path, train=True)


def test_labels_out_of_range(tmp_path):
    write_cifar100(tmp_path, [0, 100, 1], [0])
    with pytest.raises(TeskdError, match=r"label 100 is out of range.*0\.\.99"):
        load_cifar("cifar100", tmp_path, train=True)
    write_npz(tmp_path / "npz", "train.npz", np.zeros((2, 32, 32, 3), np.uint8), [-1, 0])
    with pytest.raises(TeskdError, match="label -1 is out of range"):
        load_cifar("cifar100", tmp_path / "npz", train=True)
    write_cifar10(tmp_path / "c10")  # labels go up to 9: fine for cifar10 ...
    assert int(load_cifar("cifar10", tmp_path / "c10", train=False).labels.max()) == 9
    write_npz(tmp_path / "c10npz", "train.npz", np.zeros((2, 32, 32, 3), np.uint8), [0, 10], NAMES10)
    with pytest.raises(TeskdError, match=r"label 10 is out of range.*0\.\.9"):  # ... but 10 is not
        load_cifar("cifar10", tmp_path / "c10npz", train=True)


def test_wrong_number_of_class_names(tmp_path):
    write_npz(tmp_path, "train.npz", np.zeros((2, 32, 32, 3), np.uint8), [0, 1], ["a", "b", "c"])
    with pytest.raises(TeskdError, match="3 class names, expected 100"):
        load_cifar("cifar100", tmp_path, train=True)


# --- download -----------------------------------------------------------------------------------


def _make_archive(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "src"
    written = write_cifar100(src, [4, 3, 4], [3, 4])
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(written["folder"], arcname="cifar-100-python")
    return archive, written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_extract_load(tmp_path, monkeypatch):
    archive, written = _make_archive(tmp_path)
    monkeypatch.setitem(cifar.URLS, "cifar100", archive.as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", _md5(archive))
    root = tmp_path / "data" / "nested"
    with pytest.raises(TeskdError, match="data.download=true"):
        load_cifar("cifar100", root, train=True, download=False)
    tr = load_cifar("cifar100", root, train=True, download=True)
    assert tr.labels.tolist() == [4, 3, 4]
    assert torch.equal(tr.images.reshape(3, -1), torch.from_numpy(written["train"][b"data"]))
    assert (root / "cifar-100-python.tar.gz").is_file()
    assert (root / "cifar-100-python" / "meta").is_file()
    assert not list(root.glob("*.part"))
    assert load_cifar("cifar100", root, train=False).labels.tolist() == [3, 4]


def test_download_checksum_mismatch_deletes_file(tmp_path, monkeypatch):
    archive, _ = _make_archive(tmp_path)
    monkeypatch.setitem(cifar.URLS, "cifar100", archive.as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", root, train=True, download=True)
    msg = _one_line_error(excinfo)
    assert "checksum mismatch" in msg and "0" * 32 in msg and _md5(archive) in msg
    assert not root.exists()  # neither the archive, a partial file nor the folder made for them is left behind


def test_download_unreachable_url(tmp_path, monkeypatch):
    monkeypatch.setitem(cifar.URLS, "cifar100", (tmp_path / "missing.tar.gz").as_uri())
    monkeypatch.delenv("TESKD_CIFAR100_URL", raising=False)
    root = tmp_path / "data" / "cifar100"
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", root, train=True, download=True)
    msg = _one_line_error(excinfo)
    assert msg.startswith(f"could not download {(tmp_path / 'missing.tar.gz').as_uri()} (")
    # what to do instead: the mirror variable, a copy by hand, or data the user has (TESKD_DATA, data.root)
    assert "set TESKD_CIFAR100_URL to a mirror" in msg and f"extract it into {root}," in msg
    assert "TESKD_DATA=FOLDER reads FOLDER/cifar100/" in msg and "data.root=FOLDER" in msg
    assert not (tmp_path / "data").exists()  # both folders the download made are gone: no empty data/cifar100/
    kept = tmp_path / "kept"
    (kept / "cifar100").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(TeskdError, match="could not download"):
        load_cifar("cifar100", kept / "cifar100", train=True, download=True)
    assert (kept / "cifar100").is_dir()  # a folder that was there before is not the download's to remove
    assert (kept / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad_name", ["../evil", "/abs/evil", "cifar-100-python/../../evil"])
def test_download_refuses_unsafe_members(tmp_path, monkeypatch, bad_name):
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(bad_name)
        payload = b"owned"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    monkeypatch.setitem(cifar.URLS, "cifar100", archive.as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", _md5(archive))
    root = tmp_path / "a" / "b" / "data"
    with pytest.raises(TeskdError, match="unsafe path"):
        load_cifar("cifar100", root, train=True, download=True)
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "a" / "b" / "evil").exists()
    assert not Path("/abs/evil").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_download_refuses_links(tmp_path, monkeypatch, kind):
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.type, info.linkname = kind, "/etc/passwd"
        tar.addfile(info)
    monkeypatch.setitem(cifar.URLS, "cifar100", archive.as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", _md5(archive))
    root = tmp_path / "data"
    with pytest.raises(TeskdError) as excinfo:
        load_cifar("cifar100", root, train=True, download=True)
    assert _one_line_error(excinfo).endswith("member 'cifar-100-python/train' is not a regular file or folder")
    assert not (root / "cifar-100-python").exists()


def test_download_replaces_a_bad_earlier_archive(tmp_path, monkeypatch):
    archive, written = _make_archive(tmp_path)
    monkeypatch.setitem(cifar.URLS, "cifar100", archive.as_uri())
    monkeypatch.setitem(cifar.MD5S, "cifar100", _md5(archive))
    root = tmp_path / "data"
    root.mkdir()
    (root / archive.name).write_bytes(archive.read_bytes()[:100])  # an interrupted earlier download
    tr = load_cifar("cifar100", root, train=True, download=True)
    assert torch.equal(tr.images.reshape(3, -1), torch.from_numpy(written["train"][b"data"]))
    assert _md5(root / archive.name) == _md5(archive)


# --- per-class subsets / validation split ---------------------------------------------------------


def test_first_k_per_class_exact():
    labels = torch.tensor([2, 0, 0, 1, 2, 0, 1, 2, 1, 0])
    assert first_k_per_class(labels, 2, 3).tolist() == [0, 1, 2, 3, 4, 6]
    assert first_k_per_class(labels, 1, 3).tolist() == [0, 1, 3]
    assert first_k_per_class(labels, 3, 3).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert first_k_per_class(labels, 0, 3).tolist() == []
    assert first_k_per_class(labels, 2, 3).dtype == torch.int64
    with pytest.raises(TeskdError, match="class 1 has 3"):
        first_k_per_class(labels, 4, 3)
    with pytest.raises(TeskdError, match="class 3 has 0"):  # a class absent from the labels
        first_k_per_class(labels, 1, 4)


def _arrays(labels) -> ImageArrays:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageArrays(images, torch.tensor(labels, dtype=torch.int64), ["a", "b", "c"])


def test_split_val_per_class_exact():
    arrays = _arrays([2, 0, 0, 1, 2, 0, 1, 2, 1, 0])
    train, val = split_val_per_class(arrays, 1)
    # Last image of each class: class 0 -> 9, class 1 -> 8, class 2 -> 7.
    assert val.images[:, 0, 0, 0].tolist() == [7, 8, 9]
    assert val.labels.tolist() == [2, 1, 0]
    assert train.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert train.labels.tolist() == [2, 0, 0, 1, 2, 0, 1]
    assert train.classes == val.classes == ["a", "b", "c"]

    train, val = split_val_per_class(arrays, 2)
    assert val.images[:, 0, 0, 0].tolist() == [4, 5, 6, 7, 8, 9]
    assert train.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]

    same, none = split_val_per_class(arrays, 0)
    assert same is arrays and none is None
    with pytest.raises(TeskdError, match="class 1 has 3"):
        split_val_per_class(arrays, 4)


# --- registry -----------------------------------------------------------------------------------


def test_registry(tmp_path, monkeypatch):
    spec = get_dataset_spec("cifar100")
    assert spec.num_classes == 100 and spec.image_size == 32
    assert spec.mean == (0.4914, 0.4822, 0.4465) and spec.std == (0.2023, 0.1994, 0.2010)
    assert get_dataset_spec("cifar10").num_classes == 10
    with pytest.raises(TeskdError, match="unknown dataset 'mnist'.*cifar10, cifar100"):
        get_dataset_spec("mnist")
    write_cifar100(tmp_path, [7, 8], [9])
    assert spec.load(tmp_path, train=True, download=False).labels.tolist() == [7, 8]
    assert register_dataset(spec) is spec  # registering the same spec again is harmless
    with pytest.raises(ValueError, match="'cifar100' is registered twice"):
        register_dataset(DatasetSpec("cifar100", 100, spec.mean, spec.std, 32, spec.load))
    # A new dataset registers itself where it is defined (here in a fresh registry, to leave the real one alone).
    monkeypatch.setattr(registry, "DATASETS", type(registry.DATASETS)("dataset", "teskd.data", "known datasets"))
    extra = register_dataset(DatasetSpec("tiny", 2, (0.5,) * 3, (0.5,) * 3, 8, lambda root, train, download: None))
    assert get_dataset_spec("tiny") is extra
    with pytest.raises(TeskdError, match="unknown dataset 'cifar100'; known datasets: tiny"):
        get_dataset_spec("cifar100")


# --- the real CIFAR-100 -----------------------------------------------------------------------


@pytest.mark.skipif(not (REAL_CIFAR100 / "train.npz").is_file(),
                    reason=f"real CIFAR-100 not found at {REAL_CIFAR100}: {DATA_HINT}")
def test_real_cifar100():
    tr = load_cifar("cifar100", REAL_CIFAR100, train=True)
    te = load_cifar("cifar100", REAL_CIFAR100, train=False)
    assert tr.images.shape == (50000, 3, 32, 32) and te.images.shape == (10000, 3, 32, 32)
    assert tr.labels.shape == (50000,) and te.labels.shape == (10000,)
    assert tr.labels[:10].tolist() == [19, 29, 0, 11, 1, 86, 90, 28, 23, 31]
    assert torch.bincount(tr.labels, minlength=100).tolist() == [500] * 100
    assert torch.bincount(te.labels, minlength=100).tolist() == [100] * 100
    assert tr.classes[0] == "apple" and tr.classes[99] == "worm"
    with np.load(REAL_CIFAR100 / "train.npz") as z:
        x = z["x"]
    for i in (0, 1, 12345, 49999):
        assert torch.equal(tr.images[i], torch.from_numpy(np.ascontiguousarray(x[i].transpose(2, 0, 1))))
    assert torch.equal(tr.images[:64], torch.from_numpy(x[:64].transpose(0, 3, 1, 2).copy()))
