"""The loader contract the engine depends on: Batch, rank sharding, exact resume, and the
DataLoader-backed loader (workers, per-sample seeded transforms) next to the in-memory one."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from teskd.config import DataConfig
from teskd.data.arrays import ImageArrays
from teskd.data.augment import BatchAugment, normalize
from teskd.data.loader import Batch, Loader, derive_seed
from teskd.data.memory_loader import InMemoryLoader
from teskd.data.pipeline import build_data
from teskd.data.torch_loader import TorchLoader
from teskd.errors import TeskdError

N = 23  # not a multiple of the batch sizes or world sizes used below
UNIT = partial(normalize, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x / 255


def _arrays(n: int = N, size: int = 8) -> ImageArrays:
    """Random images whose pixel (0, 0, 0) is the image's index; label = index % 5."""
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageArrays(images, torch.arange(n) % 5, [str(c) for c in range(5)])


class TensorImages(torch.utils.data.Dataset):
    """A map-style dataset of uint8 CHW tensors (module level, so workers can pickle it)."""

    def __init__(self, arrays: ImageArrays):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i):
        return self.arrays.images[i], int(self.arrays.labels[i])


class PILImages(TensorImages):
    def __getitem__(self, i):
        return Image.fromarray(self.arrays.images[i].permute(1, 2, 0).numpy()), int(self.arrays.labels[i])


def crop_flip(x: torch.Tensor) -> torch.Tensor:
    """A per-sample random transform drawing from torch's global generator, as torchvision's do."""
    top, left = torch.randint(0, 3, (2,)).tolist()
    x = torch.nn.functional.pad(x, (1, 1, 1, 1))[:, top:top + 8, left:left + 8]
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def _collect(loader, start: int = 0) -> list[Batch]:
    return [Batch(*(t.clone() for t in batch)) for batch in loader.iter_from(start)]


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def _torch_loader(dataset=None, **kw) -> TorchLoader:
    kw = {"batch_size": 4, "shuffle": True, "drop_last": False, "device": "cpu", "transform": crop_flip,
          "seed": 5, **kw}
    return TorchLoader(TensorImages(_arrays()) if dataset is None else dataset, **kw)


# --- the contract ---------------------------------------------------------------------------------


def test_batch_fields_and_both_loaders_are_loaders():
    memory = InMemoryLoader(_arrays(), 4, shuffle=True, drop_last=False, transform=UNIT, device="cpu")
    for loader in (memory, _torch_loader()):
        assert isinstance(loader, Loader)
        batch = next(iter(loader))
        assert isinstance(batch, Batch) and batch._fields == ("images", "labels", "index")
        assert batch.index.dtype == torch.int64 and batch.index.device == batch.labels.device
        assert batch.labels.tolist() == (batch.index % 5).tolist()  # the index names the samples
        assert len(loader) == 6 and loader.num_samples == N


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shuffled_shards_split_one_padded_permutation(world):
    arrays = _arrays()
    one = InMemoryLoader(arrays, 4, shuffle=True, drop_last=False, transform=UNIT, device="cpu", seed=3)
    one.set_epoch(2)
    perm = one.order().tolist()
    padded = perm + perm[: -(-N // world) * world - N]  # wrapped around, as DistributedSampler pads
    shards = []
    for rank in range(world):
        loader = InMemoryLoader(arrays, 4, shuffle=True, drop_last=False, transform=UNIT, device="cpu", seed=3,
                                rank=rank, world_size=world)
        loader.set_epoch(2)
        shards.append(torch.cat([b.index for b in loader]).tolist())
        assert loader.num_samples == -(-N // world) and len(loader) == -(-loader.num_samples // 4)
    assert all(len(s) == len(shards[0]) for s in shards)  # every rank runs the same number of steps
    assert [shards[i % world][i // world] for i in range(len(padded))] == padded


@pytest.mark.parametrize("world", [2, 3, 4])
def test_unshuffled_shards_see_each_sample_once(world):
    arrays = _arrays()
    seen = []
    for rank in range(world):
        loader = InMemoryLoader(arrays, 4, shuffle=False, drop_last=False, transform=UNIT, device="cpu",
                                rank=rank, world_size=world)
        batches = list(loader)
        index = torch.cat([b.index for b in batches])
        assert index.tolist() == list(range(rank, N, world)) and loader.num_samples == len(index)
        decoded = torch.cat([torch.round(b.images[:, 0, 0, 0] * 255).long() for b in batches])
        assert torch.equal(decoded, index) and torch.equal(torch.cat([b.labels for b in batches]), index % 5)
        seen += index.tolist()
    assert sorted(seen) == list(range(N))


def test_augmentation_stream_per_rank():
    arrays, aug = _arrays(), BatchAugment((0.5,) * 3, (0.25,) * 3, crop=8, padding=2)
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        loader = InMemoryLoader(arrays, 4, shuffle=True, drop_last=False, transform=aug, device="cpu", seed=7,
                                rank=rank, world_size=world)
        loader.set_epoch(1)
        for i, batch in enumerate(loader):
            parts = (7, 1, i) if world == 1 else (7, 1, i, rank)  # one rank keeps the 1-process stream
            want = aug(arrays.images[batch.index], torch.Generator().manual_seed(derive_seed(*parts)))
            assert torch.equal(batch.images, want)


def test_bad_rank_and_start():
    with pytest.raises(TeskdError, match="rank must lie in 0..world_size-1, got rank 2 of world size 2"):
        InMemoryLoader(_arrays(), 4, shuffle=True, drop_last=False, transform=UNIT, device="cpu", rank=2, world_size=2)
    with pytest.raises(TeskdError, match="world size 0"):
        _torch_loader(world_size=0)
    with pytest.raises(TeskdError, match="start batch must be >= 0"):
        next(_torch_loader().iter_from(-1))


# --- the DataLoader-backed loader ----------------------------------------------------------------


def test_torch_loader_same_batches_with_0_and_2_workers_and_exact_resume():
    plain = _torch_loader()
    workers = _torch_loader(num_workers=2, persistent_workers=True, prefetch_factor=2)
    for epoch in (0, 1):  # persistent workers must see the new epoch too
        plain.set_epoch(epoch)
        workers.set_epoch(epoch)
        full = _collect(plain)
        assert _same(_collect(workers), full)
        assert _same(_collect(workers, 4), full[4:]) and _same(_collect(plain, 2), full[2:])
        assert _collect(plain, len(plain)) == []
    other_epoch = torch.cat([b.images for b in full])
    plain.set_epoch(0)
    assert not torch.equal(torch.cat([b.images for b in _collect(plain)]), other_epoch)


def test_torch_loader_randomness_is_per_sample_not_per_batch():
    def by_index(loader):
        return {int(i): img for b in loader for i, img in zip(b.index, b.images)}

    small, large = by_index(_torch_loader(batch_size=3)), by_index(_torch_loader(batch_size=7, shuffle=False))
    assert sorted(small) == sorted(large) == list(range(N))
    assert all(torch.equal(small[i], large[i]) for i in range(N))
    arrays = _arrays()
    for i in range(N):  # sample i of epoch 0 is transformed under the seed (seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(5, 0, i))
            assert torch.equal(small[i], crop_flip(arrays.images[i]))
    assert any(not torch.equal(small[i], arrays.images[i]) for i in range(N))  # the transform did run


def test_torch_loader_matches_the_in_memory_order_and_leaves_the_global_rng_alone():
    memory = InMemoryLoader(_arrays(), 4, shuffle=True, drop_last=False, transform=UNIT, device="cpu", seed=5,
                            rank=1, world_size=2)
    loader = _torch_loader(rank=1, world_size=2, transform=None, device_transform=UNIT)
    state = torch.get_rng_state()
    got = _collect(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same(got, _collect(memory))  # same order, and the same images once normalised on the device


def test_torch_loader_two_ranks_evaluate_each_sample_once():
    seen = []
    for rank in (0, 1):
        loader = _torch_loader(shuffle=False, transform=None, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        index = torch.cat([b.index for b in batches])
        assert index.tolist() == list(range(rank, N, 2)) and loader.num_samples == len(index)
        assert torch.equal(torch.cat([b.images[:, 0, 0, 0] for b in batches]).long(), index)
        seen += index.tolist()
    assert sorted(seen) == list(range(N))


def test_torch_loader_with_pil_images_and_torchvision_transforms():
    tv = v2.Compose([v2.PILToTensor(), v2.RandomCrop(6, padding=1), v2.RandomHorizontalFlip()])
    runs = []
    for workers in (0, 2):
        loader = _torch_loader(PILImages(_arrays()), transform=tv, num_workers=workers, drop_last=True,
                               device_transform=UNIT)
        runs.append(_collect(loader))
        assert len(runs[-1]) == len(loader) == 5 and loader.num_samples == 20
        assert runs[-1][0].images.shape == (4, 3, 6, 6) and runs[-1][0].images.dtype == torch.float32
    assert _same(*runs)


# --- build_data ---------------------------------------------------------------------------------


def _npz_root(tmp_path, train_n=12, test_n=7):
    for name, n in (("train.npz", train_n), ("test.npz", test_n)):
        x = np.zeros((n, 32, 32, 3), np.uint8)
        x[:, 0, 0, 0] = np.arange(n)
        np.savez(tmp_path / name, x=x, y=np.arange(n) % 2, classes=np.asarray([f"c{i}" for i in range(100)]))
    return tmp_path


def test_build_data_only_the_asked_splits_and_rank_shards(tmp_path):
    root = _npz_root(tmp_path)
    cfg = DataConfig(dataset="cifar100", root=str(root), batch_size=4, eval_batch_size=2, val_per_class=1)
    full = build_data(cfg, torch.device("cpu"), seed=0)
    assert full.num_classes == 100 and (full.train.num_samples, full.val.num_samples, full.test.num_samples) == (10, 2, 7)
    (root / "train.npz").unlink()  # evaluating on test must not read the training file
    test_only = build_data(cfg, torch.device("cpu"), seed=0, rank=1, world_size=2, splits=("test",))
    assert test_only.train is None and test_only.val is None and test_only.num_classes == 100
    assert torch.cat([b.index for b in test_only.test]).tolist() == [1, 3, 5]
    with pytest.raises(TeskdError, match="unknown data split 'tset'; expected some of train, val, test"):
        build_data(cfg, torch.device("cpu"), seed=0, splits=("tset",))


def test_build_data_val_only_keeps_the_empty_split_errors(tmp_path):
    root = _npz_root(tmp_path, train_n=2)
    cfg = DataConfig(dataset="cifar100", root=str(root), val_per_class=1)
    val_only = build_data(cfg, torch.device("cpu"), seed=0, splits=("val",))  # nothing left to train on: fine
    assert val_only.train is None and val_only.test is None and val_only.val.num_samples == 2
    with pytest.raises(TeskdError, match=r"data\.val_per_class=1 holds out every training image"):
        build_data(cfg, torch.device("cpu"), seed=0, splits=("train",))
    _npz_root(tmp_path, train_n=2, test_n=0)
    with pytest.raises(TeskdError, match="the test split of cifar100 at .* holds 0 images"):
        build_data(cfg, torch.device("cpu"), seed=0, splits=("test",))
