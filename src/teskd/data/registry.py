"""The datasets the project knows: name -> how to read it and how to normalise it.

Adding a dataset is one new module that ends with ``register_dataset(DatasetSpec(...))``
plus one import line in ``teskd/data/__init__.py`` (the registry's built-ins).

A dataset that fits in memory gives ``load`` (its splits as :class:`ImageArrays`); the pipeline
selects the splits and wraps them in in-memory loaders. Any other dataset gives ``build_splits``,
which returns the loaders itself (see :func:`teskd.data.pipeline.build_data` for its arguments).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from teskd.data.arrays import ImageArrays
from teskd.registry import Registry

if TYPE_CHECKING:
    from teskd.data.pipeline import DataBundle


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int | None  # None: as many as the data holds (an image folder's class folders)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int  # the training crop, unless data.image_size says otherwise
    load: Callable[..., ImageArrays] | None = None  # load(root, train: bool, download: bool) -> ImageArrays
    # build_splits(cfg: DataConfig, splits: tuple[str, ...], root: Path, *, device, seed, rank, world_size)
    #   -> DataBundle: the asked-for splits' loaders (None for the others), num_classes and classes
    build_splits: Callable[..., DataBundle] | None = None

    def __post_init__(self):
        if self.load is None and self.build_splits is None:
            raise ValueError(f"dataset {self.name!r} needs load or build_splits")


DATASETS: Registry[DatasetSpec] = Registry("dataset", "teskd.data", "known datasets")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)
