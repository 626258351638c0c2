"""The datasets the project knows: name -> how to load it and how to normalise it.

Adding a dataset is one new module that ends with ``register_dataset(DatasetSpec(...))``
plus one import line in ``teskd/data/__init__.py`` (the registry's built-ins).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from teskd.data.arrays import ImageArrays
from teskd.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    load: Callable[..., ImageArrays]  # load(root, train: bool, download: bool) -> ImageArrays


DATASETS: Registry[DatasetSpec] = Registry("dataset", "teskd.data", "known datasets")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)
