"""Image-folder datasets (imagefolder, imagenet): listing, decoding, seeded crops in workers, exact resume,
per-class subsets on file lists, unreadable files (stop / skip), and the real imagenette-mini tree."""

from __future__ import annotations

import gc
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from teskd.config import DataConfig
from teskd.data.decode import decode_rgb
from teskd.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, image_sizes, list_images
from teskd.data.loader import Batch
from teskd.data.pipeline import DataBundle, build_data
from teskd.data.registry import get_dataset_spec
from teskd.errors import TeskdError

from conftest import DATA_HINT, IMAGENETTE as REAL  # $TESKD_DATA, then ../shared/data
CLASSES = ["cat", "dog", "fox"]
SIZES = [(37, 29), (45, 51), (33, 64), (50, 41)]  # (width, height), all different
CPU = torch.device("cpu")


def _photo(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth random colours (JPEG keeps them), so that crops and flips change the pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR).convert(mode)


def _write_tree(root: Path, per_class: int = 4, val_per_class: int = 2) -> Path:
    """``root/{train,val}/{cat,dog,fox}/``: PNG and JPEG files of odd sizes; dog's first image is grayscale."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                mode = "L" if (split, name, k) == ("train", "dog", 0) else "RGB"
                ext = (".png", ".jpg", ".JPEG")[(c + k) % 3]
                _photo(100 * c + k + (50 if split == "val" else 0), SIZES[k % 4], mode).save(
                    folder / f"img{k}{ext}", "PNG" if ext == ".png" else "JPEG", quality=95)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _write_tree(tmp_path / "tree")


def _cfg(root: Path, **kw) -> DataConfig:
    base = {"dataset": "imagefolder", "root": str(root), "image_size": 32, "batch_size": 5, "eval_batch_size": 4,
            "workers": 0}
    return DataConfig(**{**base, **kw})


def _collect(loader, start: int = 0) -> list[Batch]:
    return [Batch(*(t.clone() for t in batch)) for batch in loader.iter_from(start)]


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def _one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- listing, batches, labels ---------------------------------------------------------------------


def test_batches_labels_and_every_training_sample_once_per_epoch(tree):
    bundle = build_data(_cfg(tree), CPU, seed=3)
    assert bundle.num_classes == 3 and bundle.classes == CLASSES and bundle.val is None
    files = list_images(tree, "train", CLASSES, "imagefolder")
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    for epoch in (0, 1):
        bundle.train.set_epoch(epoch)
        batches = list(bundle.train)
        assert len(batches) == len(bundle.train) == 3 and [len(b.index) for b in batches] == [5, 5, 2]
        for b in batches:
            assert b.images.shape == (len(b.index), 3, 32, 32) and b.images.dtype == torch.float32
            assert ((b.images >= lo - 1e-5) & (b.images <= hi + 1e-5)).all()  # normalised with ImageNet's statistics
            assert torch.equal(b.labels, files.labels[b.index])
            assert [Path(files.path(i)).parent.name for i in b.index] == [CLASSES[y] for y in b.labels]
        assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(12))
    test = list(bundle.test)  # the val folder, in file order
    assert torch.cat([b.labels for b in test]).tolist() == [0, 0, 1, 1, 2, 2]
    assert all(b.images.shape[1:] == (3, 32, 32) for b in test)


def test_same_batches_with_0_and_2_workers_and_exact_mid_epoch_resume(tree):
    plain = build_data(_cfg(tree), CPU, seed=1, splits=("train",)).train
    workers = build_data(_cfg(tree, workers=2), CPU, seed=1, splits=("train",)).train
    epochs = []
    for epoch in (0, 1):  # persistent workers see the new epoch too
        plain.set_epoch(epoch)
        workers.set_epoch(epoch)
        full = _collect(plain)
        assert _same(_collect(workers), full)
        assert _same(_collect(workers, 1), full[1:]) and _same(_collect(plain, 2), full[2:])
        epochs.append(torch.cat([b.images[b.index.argsort()] for b in full]))
    assert not torch.equal(*epochs)  # each epoch draws new crops


def test_eval_is_resize_then_centre_crop_and_deterministic(tree):
    cfg = _cfg(tree, eval_resize=40)
    test = build_data(cfg, CPU, seed=0, splits=("test",)).test
    first, second = _collect(test), _collect(test)
    assert _same(first, second)
    files = list_images(tree, "val", CLASSES, "imagefolder")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for b in first:
        for i, image in zip(b.index.tolist(), b.images):
            pil = torch.from_numpy(np.array(Image.open(files.path(i)).convert("RGB"))).permute(2, 0, 1)
            want = TF.center_crop(TF.resize(pil, 40, antialias=True), 32)  # shorter side to 40, then 32 x 32
            got = (image * std + mean) * 255
            assert (got - want.float()).abs().max() <= 1.01  # JPEG decoders may differ by one level


def test_image_sizes_default_to_224_and_8_7_of_the_crop():
    spec = get_dataset_spec("imagenet")
    assert spec.image_size == 224 and spec.num_classes == 1000 and spec.load is None
    assert get_dataset_spec("imagefolder").num_classes is None
    assert image_sizes(DataConfig(dataset="imagenet"), spec) == (224, 256)
    assert image_sizes(DataConfig(dataset="imagenet", image_size=64), spec) == (64, 73)
    assert image_sizes(DataConfig(dataset="imagenet", image_size=64, eval_resize=64), spec) == (64, 64)
    with pytest.raises(TeskdError, match="data.eval_resize=200 is smaller than the crop data.image_size=224"):
        image_sizes(DataConfig(dataset="imagenet", eval_resize=200), spec)


def test_decoding_makes_three_channel_uint8_rgb():
    base = _photo(7, (9, 11))

    def encoded(image: Image.Image, fmt: str) -> torch.Tensor:
        buf = io.BytesIO()
        image.save(buf, fmt)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    for mode, fmt in (("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")):
        data = encoded(base.convert(mode), fmt)
        want = np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))
        got = decode_rgb(data)
        assert got.dtype == torch.uint8 and got.shape == (3, 11, 9), mode
        assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max() <= 1, mode
    deep = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))  # a 16-bit PNG
    assert torch.equal(decode_rgb(encoded(deep, "PNG")), torch.full((3, 4, 5), 255, dtype=torch.uint8))
    frames = [Image.new("RGB", (5, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = decode_rgb(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    assert gif.shape == (3, 4, 5) and gif[:, 0, 0].tolist() == [255, 0, 0]  # the first frame


# --- per-class selections on file lists -------------------------------------------------------------


def test_val_hold_out_and_subsets_select_files_per_class(tree):
    bundle = build_data(_cfg(tree, val_per_class=1, subset_per_class=2, test_subset_per_class=1), CPU, seed=0)
    val = list(bundle.val)
    assert bundle.val.num_samples == 3 and torch.cat([b.labels for b in val]).tolist() == [0, 1, 2]
    assert bundle.train.num_samples == 6 and bundle.test.num_samples == 3
    train_labels = torch.cat([b.labels for b in bundle.train]).tolist()
    assert sorted(train_labels) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(TeskdError, match="cannot take 5 images per class"):
        build_data(_cfg(tree, subset_per_class=5), CPU, seed=0, splits=("train",))


def test_data_bundle_stays_constructor_compatible():
    assert DataBundle(None, None, None, 10).classes is None


# --- wrong layouts ---------------------------------------------------------------------------------


def test_imagenet_needs_1000_classes(tree):
    with pytest.raises(TeskdError) as excinfo:
        build_data(_cfg(tree, dataset="imagenet"), CPU, seed=0)
    text = _one_line_error(excinfo)
    assert str(tree) in text and "1000 class folders" in text and "found 3" in text


def test_missing_and_inconsistent_folders(tmp_path, tree):
    with pytest.raises(TeskdError, match="no imagefolder data found at .*the folder does not exist"):
        build_data(_cfg(tmp_path / "nowhere"), CPU, seed=0)
    (tree / "val" / "owl").mkdir()
    with pytest.raises(TeskdError, match=r"has 1 class folder\(s\) that .* lacks \(owl\)"):
        build_data(_cfg(tree), CPU, seed=0, splits=("test",))
    shutil.rmtree(tree / "val")
    assert build_data(_cfg(tree), CPU, seed=0, splits=("train",)).train.num_samples == 12  # val not needed
    with pytest.raises(TeskdError, match=r"val does not exist; the test split of imagefolder is read from it"):
        build_data(_cfg(tree), CPU, seed=0, splits=("test",))


# --- unreadable images -------------------------------------------------------------------------------


def _break(tree: Path) -> Path:
    bad = tree / "train" / "dog" / "img1b.jpg"  # sorts between dog's img1 and img2
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_names_the_unreadable_file(tree, workers):
    bad = _break(tree)
    loader = build_data(_cfg(tree, workers=workers), CPU, seed=0, splits=("train",)).train
    with pytest.raises(TeskdError) as excinfo:
        list(loader)
    text = _one_line_error(excinfo)
    assert text.startswith(f"cannot read {bad}: ") and "data.on_bad_image=skip" in text


def test_skip_drops_counts_and_warns_once_leaving_the_rest_intact(tmp_path, capsys):
    broken, good = _write_tree(tmp_path / "broken"), _write_tree(tmp_path / "good")
    bad = _break(broken)
    _photo(0, (30, 30)).save(good / "train" / "dog" / "img1b.jpg", "JPEG")
    skipping = build_data(_cfg(broken, workers=2, on_bad_image="skip"), CPU, seed=4, splits=("train",)).train
    reference = build_data(_cfg(good), CPU, seed=4, splits=("train",)).train
    files = list_images(broken, "train", CLASSES, "imagefolder")
    bad_index = [files.path(i) for i in range(len(files))].index(str(bad))
    for epoch in (0, 1):
        skipping.set_epoch(epoch)
        reference.set_epoch(epoch)
        got, want = _collect(skipping), _collect(reference)
        assert [b.index.tolist() for b in got] == [[i for i in b.index.tolist() if i != bad_index] for b in want]
        for g, w in zip(got, want):
            keep = w.index != bad_index
            assert torch.equal(g.images, w.images[keep]) and torch.equal(g.labels, w.labels[keep])
        assert [s.source for s in skipping.skipped] == [str(bad)]
        out = capsys.readouterr().out
        assert out.count("warning: skipped 1 unreadable image in epoch") == 1 and str(bad) in out
    one_by_one = build_data(_cfg(broken, on_bad_image="skip", batch_size=1), CPU, seed=4, splits=("train",)).train
    with pytest.raises(TeskdError, match=r"every image of batch \d+ of epoch 1 is unreadable"):
        list(one_by_one)


# --- the real ImageNet-style tree -----------------------------------------------------------------


def test_real_imagenette_mini_end_to_end():
    if not (REAL / "train").is_dir():
        pytest.skip(f"imagenette-mini not found at {REAL}: {DATA_HINT}")
    cfg = DataConfig(dataset="imagefolder", root=str(REAL), image_size=32, batch_size=16, eval_batch_size=16,
                     workers=2)
    bundle = build_data(cfg, CPU, seed=0, splits=("train", "test"))
    assert bundle.num_classes == 10 and all(c.startswith("n") and len(c) == 9 for c in bundle.classes)
    assert bundle.train.num_samples == 600 and bundle.test.num_samples == 200
    for loader in (bundle.train, bundle.test):
        batch = next(iter(loader))
        assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
        assert torch.isfinite(batch.images).all() and batch.images.std() > 0.1
        assert batch.labels.min() >= 0 and batch.labels.max() < 10


@pytest.mark.parametrize("cycle", [False, True])
def test_a_loader_dropped_mid_epoch_stops_its_workers_cleanly(tree, cycle):
    """Dropping a loader with persistent workers shuts them down at once (no reference cycle keeps them) and
    cleanly, exit code 0; from a cycle the garbage collector frees, through the loader's finaliser."""
    loader = build_data(_cfg(tree, workers=2), CPU, seed=0, splits=("train",)).train
    batches = loader.iter_from(0)
    next(batches)
    workers = list(loader._loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    gc.disable()
    try:
        if cycle:
            holder = {"loader": loader}
            holder["self"] = holder
            del holder
        del batches, loader
        assert not any(w.is_alive() for w in workers) or cycle  # by reference counting alone
        gc.collect()
        for w in workers:
            w.join(timeout=30)  # terminated at once when broken, at worst after a timeout
        assert [w.exitcode for w in workers] == [0, 0]  # not killed
    finally:
        gc.enable()
