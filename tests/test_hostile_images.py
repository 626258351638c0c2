"""Image folders and image files from strangers: a FIFO named like a JPEG, class folders linked to the data root or
to huge trees, link loops, hidden folders, every format the decoder reads (WebP too) and decompression bombs,
in training (stop and skip) and in ``teskd predict``. Every input is built here, in tmp_path, and small."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from teskd.cli import main
from teskd.config import DataConfig
from teskd.data import listing
from teskd.data.decode import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, image_extent
from teskd.data.imagefolder import find_image_classes, list_images
from teskd.data.pipeline import build_data
from teskd.deploy import predict, preprocess
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.predict import find_images
from teskd.deploy.preprocess import read_image
from teskd.errors import TeskdError

from conftest import REPO

CONFIG = str(REPO / "configs" / "imagefolder" / "small_resnet18_teskd.yaml")
# train.channels_last=false: on this machine's torch 2.14 CPU build, channels_last with train.threads=1 corrupts
# the heap in the backward pass of the 1/16-width ResNet-18 (reproduced without any data); unrelated to images.
TINY = ["data.image_size=32", "data.eval_resize=36", "data.batch_size=4", "data.on_bad_image=stop",
        "model.width_mult=0.0625", "train.epochs=1", "schedule.warmup_epochs=0", "train.progress=false",
        "train.threads=1", "train.channels_last=false"]
STOP_HINT = "; fix or remove the file, or set data.on_bad_image=skip to skip unreadable images"
BOMB = ("its header declares 30000x30000 pixels (900,000,000 in all), more than the 89,478,485 pixels teskd decodes "
        "(a decompression bomb, or an image to shrink first)")
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP"}
CPU = torch.device("cpu")


def _image(path: Path, shade: int = 0, size: tuple[int, int] = (20, 18)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 100, 7)).save(path, FORMATS[path.suffix.lower()])
    return path


def _tree(root: Path, classes=("a", "b"), per_class: int = 3, suffix: str = ".png") -> Path:
    """``root/{train,val}/<class>/<i><suffix>``: small solid images, different per file."""
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _image(root / split / c / f"{i}{suffix}", 40 * i)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "image_size": 32, "batch_size": 4,
                         "workers": 0, **kw})


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A valid PNG header declaring width x height RGB pixels, then a ~1 KB zlib stream of zero rows: a few KB
    on disk that a decoder would allocate width * height * 3 bytes for."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = zlib.compress(b"\0" * (1 << 20), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_bomb_decoding(monkeypatch):
    """The decoder, refusing (failing the test) if it is ever handed a bomb: the pixel check must come
    first. ``bombs`` collects the bytes of the bombs a test makes."""
    from teskd.data import decode

    real, bombs = decode._decode, []

    def guarded(encoded: bytes):
        if any(encoded == b for b in bombs):
            raise AssertionError("the decoder was handed a decompression bomb")
        return real(encoded)

    monkeypatch.setattr(decode, "_decode", guarded)
    return bombs


@contextlib.contextmanager
def deadline(seconds: int = 120):
    """Fails (instead of hanging the test session) if the block blocks: a guard, not a timing assertion."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _teskd(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI in its own process group, so a hang is a failed test, not a hung session (and a hung DataLoader
    worker is killed with it, not left behind)."""
    proc = subprocess.Popen([sys.executable, "-m", "teskd", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"teskd {' '.join(args[:2])} still running after {timeout} s (hung): {err[-500:]!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- 1. a FIFO named like an image ----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_fifo_image_stops_training_in_one_line(tmp_path, workers):
    data = _tree(tmp_path / "data")
    fifo = data / "train" / "a" / "1b.jpg"
    os.mkfifo(fifo)
    proc = _teskd("train", CONFIG, f"data.root={data}", f"data.workers={workers}", *TINY, "--out",
                  str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: cannot read {fifo}: it is a FIFO (named pipe), not a regular file{STOP_HINT}"]


def test_fifo_image_is_skipped_counted_and_reported(tmp_path):
    data = _tree(tmp_path / "data")
    fifo = data / "train" / "a" / "1b.jpg"
    os.mkfifo(fifo)
    proc = _teskd("train", CONFIG, f"data.root={data}", "data.workers=1", *TINY, "data.on_bad_image=skip",
                  "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: skipped 1 unreadable image in epoch 1 (the first: {fifo}: it is a FIFO (named pipe), "
            f"not a regular file)") in proc.stdout.splitlines()


def test_read_image_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(TeskdError) as err:
        read_image(fifo)
    assert str(err.value) == f"cannot read image {fifo}: it is a FIFO (named pipe), not a regular file"


# --- 2. class folders linked to the wrong place, link loops ---------------------------------------------


def test_class_folder_linked_to_a_folder_holding_the_data_is_refused_at_once(tmp_path, capsys):
    data = _tree(tmp_path / "data")
    (data / "train" / "c").symlink_to(tmp_path, target_is_directory=True)  # as `ln -s / c`: the data lie within
    (data / "val" / "c").mkdir()
    with deadline():
        assert main(["train", CONFIG, f"data.root={data}", "data.workers=0", *TINY, "--out",
                     str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: class folder {data / 'train' / 'c'} is {tmp_path}, a folder that holds the data set itself: it is "
        f"linked to the wrong place"]


def test_class_folder_linked_to_a_huge_tree_stops_at_the_depth_bound(tmp_path):
    data = _tree(tmp_path / "data")
    deep = tmp_path / "elsewhere"
    leaf = deep.joinpath(*["d"] * (listing.MAX_DEPTH + 4))
    _image(leaf / "x.png")
    (deep / "loop").symlink_to(deep, target_is_directory=True)  # and a loop, skipped
    (data / "train" / "b").rename(tmp_path / "old_b")
    (data / "train" / "b").symlink_to(deep, target_is_directory=True)
    with deadline(), pytest.raises(TeskdError) as err:
        list_images(data, "train", ["a", "b"], "imagefolder")
    assert str(err.value) == (f"listing {data / 'train' / 'b'} passed 32 levels of folders, more than any image "
                              f"data set has; class folder b (or a folder in it) may be linked to the wrong place")


def test_class_folder_linked_to_a_huge_tree_stops_at_the_entry_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "MAX_ENTRIES", 100)  # 20 million in earnest: a tree that large is not built here
    data = _tree(tmp_path / "data")
    big = tmp_path / "big"
    for i in range(3):
        (big / f"part{i}").mkdir(parents=True)
        for k in range(40):
            (big / f"part{i}" / f"note{k}.txt").write_bytes(b"")
    (data / "train" / "c").symlink_to(big, target_is_directory=True)
    with pytest.raises(TeskdError) as err:
        list_images(data, "train", ["a", "b", "c"], "imagefolder")
    assert str(err.value) == (f"listing {data / 'train' / 'c'} passed 100 entries, more than any image data set "
                              f"has; class folder c (or a folder in it) may be linked to the wrong place")


def test_link_loops_inside_a_class_are_listed_once_with_one_warning(tmp_path, capsys):
    data = _tree(tmp_path / "data")
    a = data / "train" / "a"
    (a / "loop").symlink_to(".", target_is_directory=True)  # ln -s . loop
    _image(a / "sub" / "x.png")
    (a / "sub" / "up").symlink_to("..", target_is_directory=True)
    with deadline():
        files = list_images(data, "train", ["a", "b"], "imagefolder")
    names = [os.fsdecode(n) for n in files.names]
    assert names == ["a/0.png", "a/1.png", "a/2.png", "a/sub/x.png", "b/0.png", "b/1.png", "b/2.png"]
    assert files.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {data / 'train'}: skipped 2 links to folders listed already (the first: a/loop, the same folder "
        f"as a); their images are listed once"]
    loader = build_data(_cfg(data), CPU, seed=0, splits=("train",)).train
    assert loader.num_samples == 7  # not 7 * 41 (os.walk follows the loop until the path is too long)


def test_class_folder_that_is_a_link_to_a_real_folder_elsewhere_is_a_class(tmp_path, capsys):
    data = _tree(tmp_path / "data", classes=("a",))
    for split in ("train", "val"):
        for i in range(2):
            _image(tmp_path / "photos" / split / f"dog{i}.jpg", 90 * i)
        (data / split / "b").symlink_to(tmp_path / "photos" / split, target_is_directory=True)
    assert find_image_classes(data, "imagefolder", None) == ["a", "b"]
    files = list_images(data, "train", ["a", "b"], "imagefolder")
    assert [os.fsdecode(n) for n in files.names] == ["a/0.png", "a/1.png", "a/2.png", "b/dog0.jpg", "b/dog1.jpg"]
    assert files.labels.tolist() == [0, 0, 0, 1, 1]
    assert capsys.readouterr().out == ""  # nothing skipped, nothing to warn about
    (data / "train" / "c").symlink_to(tmp_path / "photos" / "train", target_is_directory=True)
    with pytest.raises(TeskdError) as err:
        list_images(data, "train", ["a", "b", "c"], "imagefolder")
    assert str(err.value) == (f"class folders {data / 'train' / 'b'} and {data / 'train' / 'c'} are the same folder "
                              f"(a link): each class needs its own folder of images")


def test_listing_stats_folders_never_image_files(tmp_path, monkeypatch):
    """What keeps an ImageNet-sized listing fast: files are told from folders by the directory entry alone."""
    data = _tree(tmp_path / "data", classes=("a", "b", "c"), per_class=20)
    (data / "train" / "a" / "nested").mkdir()
    _image(data / "train" / "a" / "nested" / "n.png")
    real, stats = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stats.append(os.fspath(path)) or real(path, *a, **k))
    files = list_images(data, "train", ["a", "b", "c"], "imagefolder")
    assert len(files) == 61
    assert not [p for p in stats if str(p).endswith(".png")]
    assert {str(data / "train" / c) for c in ("a", "b", "c")} | {str(data / "train" / "a" / "nested")} <= set(stats)


# --- 3. hidden entries ------------------------------------------------------------------------------------


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path, capsys):
    data = _tree(tmp_path / "data")
    (data / "train" / ".ipynb_checkpoints").mkdir()  # empty: was taken as a class and the run refused
    (data / "val" / ".ipynb_checkpoints").mkdir()
    _image(data / "train" / ".hidden" / "0.png")
    _image(data / "train" / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (data / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not an image")
    assert find_image_classes(data, "imagefolder", None) == ["a", "b"]
    files = list_images(data, "train", ["a", "b"], "imagefolder")
    assert [os.fsdecode(n) for n in files.names] == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png"]
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"data.root={data}", "data.workers=0", *TINY, "--out", str(run)]) == 0
    assert "warning" not in capsys.readouterr().out  # data.on_bad_image=stop: no hidden file was read


# --- 4. one set of formats: what the decoder reads --------------------------------------------------------


def test_listed_suffixes_are_exactly_the_formats_the_decoder_reads(tmp_path):
    assert set(IMAGE_SUFFIXES) == set(FORMATS)  # a new suffix needs a format here, and the check below
    assert predict.IMAGE_SUFFIXES is IMAGE_SUFFIXES  # predict's folder search takes the same ones
    for suffix, size in zip(IMAGE_SUFFIXES, ((31, 17), (8, 40), (23, 23), (5, 9), (64, 3))):
        path = _image(tmp_path / f"x{suffix}", 200, size)
        extent = image_extent(path.read_bytes())
        assert (extent.width, extent.height) == size, suffix
        assert tuple(read_image(path).shape) == (3, size[1], size[0]), suffix
    for fmt in ("BMP", "TIFF"):  # PIL writes (and reads) them; teskd decodes the four formats above only
        path = tmp_path / f"x.{fmt.lower()}"
        Image.new("RGB", (4, 4)).save(path, fmt)
        with pytest.raises(TeskdError) as err:
            read_image(path)
        assert str(err.value) == f"cannot read image {path}: it is not a JPEG, PNG, GIF or WebP image"


@pytest.fixture(scope="module")
def webp_run(tmp_path_factory):
    """A run trained on a folder whose class b is WebP only (left out of training before: class b was empty)."""
    data = _tree(tmp_path_factory.mktemp("webp") / "data", classes=("a",))
    for split in ("train", "val"):
        for i in range(3):
            _image(data / split / "b" / f"{i}.webp", 60 * i + 30)
    run = data.parent / "run"
    assert main(["train", CONFIG, f"data.root={data}", "data.workers=0", *TINY, "--out", str(run)]) == 0
    return data, run


def test_webp_images_are_listed_and_trained(webp_run):
    import json

    data, run = webp_run
    files = list_images(data, "train", ["a", "b"], "imagefolder")
    assert [os.fsdecode(n) for n in files.names] == ["a/0.png", "a/1.png", "a/2.png", "b/0.webp", "b/1.webp",
                                                     "b/2.webp"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1
    loader = build_data(_cfg(data), CPU, seed=0, splits=("train",)).train
    batches = list(loader)
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(6))  # the WebPs decoded too
    assert loader.skipped == []


def test_predict_searches_folders_for_the_same_formats(tmp_path):
    for name in ("a.webp", "b.gif", "c.JPG", "d.png"):
        _image(tmp_path / "in" / name)
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "e.bmp", "BMP")
    assert [p.name for p in find_images([tmp_path / "in"])] == ["a.webp", "b.gif", "c.JPG", "d.png"]


# --- 5. decompression bombs ----------------------------------------------------------------------------


def test_png_bomb_is_refused_from_its_header(tmp_path, no_bomb_decoding):
    bomb = _png_bomb(tmp_path / "bomb.png")
    no_bomb_decoding.append(bomb.read_bytes())
    assert bomb.stat().st_size < 8192
    with pytest.raises(Image.DecompressionBombError, match=r"\(900000000 pixels\)"):  # well-formed: PIL agrees
        Image.open(bomb)
    with pytest.raises(TeskdError) as err:
        read_image(bomb)
    assert str(err.value) == f"cannot read image {bomb}: {BOMB}"
    assert MAX_IMAGE_PIXELS == 89_478_485


def _patched(fmt: str, width: int, height: int) -> bytes:
    """A real small image of ``fmt`` whose header is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    data = bytearray(buf.getvalue())
    if fmt == "JPEG":
        at = data.index(b"\xff\xc0") + 5  # SOF0: length, precision, then height and width
        data[at:at + 4] = struct.pack(">HH", height, width)
    elif fmt == "WEBP":
        assert data[12:16] == b"VP8L"
        bits = struct.unpack_from("<I", data, 21)[0] & ~((1 << 28) - 1)
        struct.pack_into("<I", data, 21, bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def _gif(frames: list[tuple[int, int]]) -> bytes:
    """A GIF89a with a 2-colour table and one 1-pixel LZW stream per frame, each frame declaring its size."""
    out = b"GIF89a" + struct.pack("<HHBBB", *frames[0], 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    out += b"!\xf9\x04\x01\x00\x00\x00\x00"  # a graphic control extension
    for w, h in frames:
        out += b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02D\x01\x00"
    return out + b";"


def test_bombs_in_every_format_are_refused_before_decoding(tmp_path, no_bomb_decoding):
    one = tmp_path / "one.gif"
    one.write_bytes(_gif([(1, 1)]))
    assert tuple(read_image(one).shape) == (3, 1, 1)  # the hand-made GIF is a real one
    cases = {"big.jpg": (_patched("JPEG", 40000, 40000), "40000x40000 pixels (1,600,000,000 in all)"),
             "big.webp": (_patched("WEBP", 16384, 16384), "16384x16384 pixels (268,435,456 in all)"),
             "big.gif": (_gif([(20000, 20000)]), "20000x20000 pixels (400,000,000 in all)"),
             "frames.gif": (_gif([(300, 300)] * 1000), "1000 frames, the first of 300x300 pixels (90,000,000 in all)")}
    for name, (data, declared) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        no_bomb_decoding.append(data)
        with pytest.raises(TeskdError) as err:
            read_image(path)
        assert str(err.value) == (f"cannot read image {path}: its header declares {declared}, more than the 89,478,485 "
                                  f"pixels teskd decodes (a decompression bomb, or an image to shrink first)")
    assert image_extent(_gif([(300, 300)] * 994)).pixels == 89_460_000  # just under the cap: decoded as usual


def test_png_bomb_in_training_stops_in_one_line(tmp_path, capsys, no_bomb_decoding):
    data = _tree(tmp_path / "data")
    bomb = _png_bomb(data / "train" / "b" / "1b.png")
    no_bomb_decoding.append(bomb.read_bytes())
    assert main(["train", CONFIG, f"data.root={data}", "data.workers=0", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: cannot read {bomb}: {BOMB}{STOP_HINT}"]


def test_png_bomb_in_training_is_skipped_and_reported(tmp_path, capsys, no_bomb_decoding):
    data = _tree(tmp_path / "data")
    bomb = _png_bomb(data / "train" / "b" / "1b.png")
    no_bomb_decoding.append(bomb.read_bytes())
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"data.root={data}", "data.workers=1", *TINY, "data.on_bad_image=skip",
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipped 1 unreadable image in epoch 1 (the first: {bomb}: {BOMB})" in out.splitlines()


def test_png_bomb_in_predict_is_skipped_named(webp_run, tmp_path, capsys, no_bomb_decoding):
    data, run = webp_run
    bomb = _png_bomb(tmp_path / "bomb.png")
    no_bomb_decoding.append(bomb.read_bytes())
    good = data / "val" / "b" / "0.webp"
    assert main(["predict", str(run), str(good), str(bomb), "--topk", "1"]) == 0
    cap = capsys.readouterr()
    assert [line.split()[0] for line in cap.out.splitlines()] == [str(good)]
    assert cap.err.splitlines() == [f"skipped {bomb}: {BOMB}"]
    assert main(["predict", str(run), str(bomb)]) == 2
    assert "none of the 1 image file(s) could be read" in capsys.readouterr().err
    info = DeployInfo(arch="resnet18_imagenet", num_classes=2, width_mult=0.0625, input_size=32, resize=36,
                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=("a", "b"), dataset="imagefolder",
                      config_hash="ab" * 32, teskd_version="0.1.0")
    with pytest.raises(TeskdError) as err:
        preprocess.Preprocess(info)(bomb)  # the Python API's path input
    assert str(err.value) == f"cannot read image {bomb}: {BOMB}"
