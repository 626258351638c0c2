"""What a dataset hands the trainer: the loaders of the asked-for splits and what they classify."""

from __future__ import annotations

from dataclasses import dataclass

from teskd.data.loader import Loader


@dataclass
class DataBundle:
    train: Loader | None  # None: not asked for
    val: Loader | None  # None: not asked for, or data.val_per_class=0
    test: Loader | None
    num_classes: int
    classes: list[str] | None = None  # the class names in label order (None: unknown)
