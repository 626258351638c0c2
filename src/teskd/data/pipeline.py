"""From the data config to ready-to-iterate train/val/test loaders on the training device."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from teskd.config import DataConfig, resolve_data_root
from teskd.data.augment import BatchAugment, normalize
from teskd.data.cifar import first_k_per_class, split_val_per_class
from teskd.data.loaders import InMemoryLoader
from teskd.data.registry import get_dataset_spec
from teskd.errors import TeskdError


@dataclass
class DataBundle:
    train: InMemoryLoader
    val: InMemoryLoader | None
    test: InMemoryLoader
    num_classes: int
    classes: list[str]


def load_splits(cfg: DataConfig):
    """The (train, val or None, test) arrays the config describes, on the CPU."""
    spec = get_dataset_spec(cfg.dataset)
    root = resolve_data_root(cfg)
    train = spec.load(root, train=True, download=cfg.download)
    test = spec.load(root, train=False, download=False)
    if len(train) == 0:
        raise TeskdError(f"the training split of {cfg.dataset} at {root} holds 0 images")
    if len(test) == 0:
        raise TeskdError(f"the test split of {cfg.dataset} at {root} holds 0 images; "
                         f"evaluating the model needs at least one")
    train, val = split_val_per_class(train, cfg.val_per_class)
    if len(train) == 0:
        raise TeskdError(f"data.val_per_class={cfg.val_per_class} holds out every training image of "
                         f"{cfg.dataset} at {root}, leaving none to train on")
    if val is not None and len(val) == 0:
        raise TeskdError(f"data.val_per_class={cfg.val_per_class} gives an empty validation split "
                         f"of {cfg.dataset} at {root}")
    if cfg.subset_per_class is not None:
        train = train.select(first_k_per_class(train.labels, cfg.subset_per_class, spec.num_classes))
        if len(train) == 0:
            raise TeskdError(f"data.subset_per_class={cfg.subset_per_class} leaves no training images")
    if cfg.test_subset_per_class is not None:
        test = test.select(first_k_per_class(test.labels, cfg.test_subset_per_class, spec.num_classes))
        if len(test) == 0:
            raise TeskdError(f"data.test_subset_per_class={cfg.test_subset_per_class} leaves no test images; "
                             f"evaluating the model needs at least one")
    return spec, train, val, test


def build_data(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    spec, train, val, test = load_splits(cfg)
    augment = BatchAugment(spec.mean, spec.std, crop=spec.image_size, padding=cfg.crop_padding, flip=cfg.hflip)
    plain = partial(normalize, mean=spec.mean, std=spec.std)

    def eval_loader(arrays):
        return InMemoryLoader(arrays, cfg.eval_batch_size, shuffle=False, drop_last=False,
                              transform=plain, device=device, seed=seed)

    return DataBundle(
        train=InMemoryLoader(train, cfg.batch_size, shuffle=True, drop_last=False, transform=augment,
                             device=device, seed=seed),
        val=eval_loader(val) if val is not None else None,
        test=eval_loader(test),
        num_classes=spec.num_classes,
        classes=train.classes,
    )
