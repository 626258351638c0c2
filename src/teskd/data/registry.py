"""The datasets the project knows: name -> how to load it and how to normalise it.

Adding a dataset is one new module with a ``load(root, train, download) -> ImageArrays``
function plus one ``register_dataset(DatasetSpec(...))`` line at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from teskd.data.arrays import ImageArrays
from teskd.data.cifar import load_cifar
from teskd.errors import TeskdError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    load: Callable[..., ImageArrays]  # load(root, train: bool, download: bool) -> ImageArrays


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Adds ``spec`` to :data:`DATASETS` under ``spec.name``."""
    if spec.name in DATASETS and not replace:
        raise TeskdError(f"a dataset named {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError as err:
        raise TeskdError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from err


# The normalisation of the official TESKD code, used for both CIFAR variants.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)

register_dataset(DatasetSpec("cifar100", 100, _CIFAR_MEAN, _CIFAR_STD, 32, partial(load_cifar, "cifar100")))
register_dataset(DatasetSpec("cifar10", 10, _CIFAR_MEAN, _CIFAR_STD, 32, partial(load_cifar, "cifar10")))
