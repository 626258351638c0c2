"""From the data config to ready-to-iterate train/val/test loaders on the training device."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from teskd.config import DataConfig, resolve_data_root
from teskd.data.arrays import ImageArrays
from teskd.data.augment import BatchAugment, normalize
from teskd.data.loader import Loader
from teskd.data.memory_loader import InMemoryLoader
from teskd.data.registry import DatasetSpec, get_dataset_spec
from teskd.data.splits import first_k_per_class, split_val_per_class
from teskd.errors import TeskdError

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    train: Loader | None  # None: not asked for
    val: Loader | None  # None: not asked for, or data.val_per_class=0
    test: Loader | None
    num_classes: int


def _train_val(cfg: DataConfig, spec: DatasetSpec, root: Path, training: bool):
    train = spec.load(root, train=True, download=cfg.download)
    if len(train) == 0:
        raise TeskdError(f"the training split of {cfg.dataset} at {root} holds 0 images")
    train, val = split_val_per_class(train, cfg.val_per_class)
    if training and len(train) == 0:
        raise TeskdError(f"data.val_per_class={cfg.val_per_class} holds out every training image of "
                         f"{cfg.dataset} at {root}, leaving none to train on")
    if training and cfg.subset_per_class is not None:
        train = train.select(first_k_per_class(train.labels, cfg.subset_per_class, spec.num_classes))
        if len(train) == 0:
            raise TeskdError(f"data.subset_per_class={cfg.subset_per_class} leaves no training images")
    return train, val


def _test(cfg: DataConfig, spec: DatasetSpec, root: Path) -> ImageArrays:
    test = spec.load(root, train=False, download=cfg.download)
    if len(test) == 0:
        raise TeskdError(f"the test split of {cfg.dataset} at {root} holds 0 images; "
                         f"evaluating the model needs at least one")
    if cfg.test_subset_per_class is not None:
        test = test.select(first_k_per_class(test.labels, cfg.test_subset_per_class, spec.num_classes))
        if len(test) == 0:
            raise TeskdError(f"data.test_subset_per_class={cfg.test_subset_per_class} leaves no test images; "
                             f"evaluating the model needs at least one")
    return test


def load_splits(cfg: DataConfig, splits: Collection[str] = SPLITS):
    """``(spec, train, val, test)``: the arrays of the asked-for splits on the CPU (only their files are
    read), None for the others; val is the last ``data.val_per_class`` training images of each class."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise TeskdError(f"unknown data split {unknown[0]!r}; expected some of {', '.join(SPLITS)}")
    spec = get_dataset_spec(cfg.dataset)
    root = resolve_data_root(cfg)
    train = val = test = None
    if "train" in splits or "val" in splits:
        train, val = _train_val(cfg, spec, root, training="train" in splits)
        train, val = (train if "train" in splits else None), (val if "val" in splits else None)
    if "test" in splits:
        test = _test(cfg, spec, root)
    return spec, train, val, test


def build_data(cfg: DataConfig, device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
               splits: Collection[str] = SPLITS) -> DataBundle:
    """Loaders for the asked-for splits; batch sizes are per rank, each rank gets its shard."""
    spec, train, val, test = load_splits(cfg, splits)

    def loader(arrays, training: bool):
        if arrays is None:
            return None
        transform = (BatchAugment(spec.mean, spec.std, crop=spec.image_size, padding=cfg.crop_padding, flip=cfg.hflip)
                     if training else partial(normalize, mean=spec.mean, std=spec.std))
        return InMemoryLoader(arrays, cfg.batch_size if training else cfg.eval_batch_size, shuffle=training,
                              drop_last=False, transform=transform, device=device, seed=seed, rank=rank,
                              world_size=world_size)

    return DataBundle(train=loader(train, True), val=loader(val, False), test=loader(test, False),
                      num_classes=spec.num_classes)
