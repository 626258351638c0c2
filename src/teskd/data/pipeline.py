"""From the data config to ready-to-iterate train/val/test loaders on the training device."""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Any

import torch

from teskd.config import DataConfig, resolve_data_root
from teskd.data.augment import BatchAugment, normalize
from teskd.data.bundle import DataBundle
from teskd.data.memory_loader import InMemoryLoader
from teskd.data.registry import DatasetSpec, get_dataset_spec
from teskd.data.splits import first_k_per_class, split_val_per_class
from teskd.errors import TeskdError

SPLITS = ("train", "val", "test")
__all__ = ["DataBundle", "SPLITS", "build_data", "check_splits", "class_count", "input_size", "load_splits",
           "memory_splits", "select_splits"]


def check_splits(splits: Collection[str]) -> None:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise TeskdError(f"unknown data split {unknown[0]!r}; expected some of {', '.join(SPLITS)}")


def _per_class(data, k: int, num_classes: int):
    return data.select(first_k_per_class(data.labels, k, num_classes))


def _train_val(cfg: DataConfig, train, root: Path, training: bool, num_classes: int):
    if len(train) == 0:
        raise TeskdError(f"the training split of {cfg.dataset} at {root} holds 0 images")
    train, val = split_val_per_class(train, cfg.val_per_class)
    if training and len(train) == 0:
        raise TeskdError(f"data.val_per_class={cfg.val_per_class} holds out every training image of "
                         f"{cfg.dataset} at {root}, leaving none to train on")
    if training and cfg.subset_per_class is not None:
        train = _per_class(train, cfg.subset_per_class, num_classes)
        if len(train) == 0:
            raise TeskdError(f"data.subset_per_class={cfg.subset_per_class} leaves no training images")
    return train, val


def _test(cfg: DataConfig, test, root: Path, num_classes: int):
    if len(test) == 0:
        raise TeskdError(f"the test split of {cfg.dataset} at {root} holds 0 images; "
                         f"evaluating the model needs at least one")
    if cfg.test_subset_per_class is not None:
        test = _per_class(test, cfg.test_subset_per_class, num_classes)
        if len(test) == 0:
            raise TeskdError(f"data.test_subset_per_class={cfg.test_subset_per_class} leaves no test images; "
                             f"evaluating the model needs at least one")
    return test


def select_splits(cfg: DataConfig, splits: Collection[str], root: Path, read: Callable[[bool], Any],
                  num_classes: int | None = None) -> tuple:
    """``(train, val, test)``: the asked-for splits, None for the others. ``read(train)`` gives a split
    (:class:`ImageArrays` or any ``labels``/``classes``/``select``/``len`` collection) and is called only
    for the splits needed; val is the last ``data.val_per_class`` training images of each class, the
    subsets are the first images of each class. ``num_classes`` defaults to the split's class names."""
    check_splits(splits)
    train = val = test = None
    if "train" in splits or "val" in splits:
        data = read(True)
        train, val = _train_val(cfg, data, root, "train" in splits, num_classes or len(data.classes))
        train, val = (train if "train" in splits else None), (val if "val" in splits else None)
    if "test" in splits:
        data = read(False)
        test = _test(cfg, data, root, num_classes or len(data.classes))
    return train, val, test


def load_splits(cfg: DataConfig, splits: Collection[str] = SPLITS):
    """``(spec, train, val, test)``: the arrays of the asked-for splits of an in-memory dataset on the CPU
    (only their files are read), None for the others."""
    check_splits(splits)
    spec = get_dataset_spec(cfg.dataset)
    if spec.load is None:
        raise TeskdError(f"data.dataset={cfg.dataset} is read from its files while training, not loaded into "
                         f"memory; use build_data for its loaders")
    root = resolve_data_root(cfg)
    read = partial(_load, spec, root, cfg.download)
    return (spec, *select_splits(cfg, splits, root, read, spec.num_classes))


def _load(spec: DatasetSpec, root: Path, download: bool, train: bool):
    return spec.load(root, train=train, download=download)


def build_data(cfg: DataConfig, device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
               splits: Collection[str] = SPLITS) -> DataBundle:
    """Loaders for the asked-for splits; batch sizes are per rank, each rank gets its shard."""
    check_splits(splits)
    build = get_dataset_spec(cfg.dataset).build_splits or memory_splits  # a dataset giving load: in memory
    return build(cfg, tuple(splits), resolve_data_root(cfg), device=device, seed=seed, rank=rank,
                 world_size=world_size)


def memory_splits(cfg: DataConfig, splits: Collection[str], root: Path, *, device: torch.device, seed: int,
                  rank: int = 0, world_size: int = 1) -> DataBundle:
    """The ``build_splits`` of a dataset that gives ``load``: its arrays in in-memory loaders, augmented and
    normalised in batches on the training device."""
    spec, train, val, test = load_splits(cfg, splits)

    def loader(arrays, training: bool):
        if arrays is None:
            return None
        transform = (BatchAugment(spec.mean, spec.std, crop=spec.image_size, padding=cfg.crop_padding, flip=cfg.hflip,
                                  autoaugment=cfg.autoaugment, cutout=cfg.cutout)
                     if training else partial(normalize, mean=spec.mean, std=spec.std))
        return InMemoryLoader(arrays, cfg.batch_size if training else cfg.eval_batch_size, shuffle=training,
                              drop_last=False, transform=transform, device=device, seed=seed, rank=rank,
                              world_size=world_size)

    classes = next((a.classes for a in (train, val, test) if a is not None), None)
    return DataBundle(train=loader(train, True), val=loader(val, False), test=loader(test, False),
                      num_classes=spec.num_classes, classes=classes)


def input_size(cfg: DataConfig) -> int:
    """The size of the network's input images (the dataset's spec decides whether data.image_size applies)."""
    return get_dataset_spec(cfg.dataset).input_size(cfg)


def class_count(cfg: DataConfig) -> int:
    """The number of classes: fixed by the dataset, or counted in its data (an image folder's class folders)."""
    return get_dataset_spec(cfg.dataset).class_count(cfg)
