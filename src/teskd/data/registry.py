"""The datasets the project knows: name -> a :class:`DatasetSpec`, everything others ask of a dataset.

Adding a dataset is one new module that ends with ``register_dataset(DatasetSpec(...))`` (an image-folder
layout: ``register_dataset(folder_dataset(...))`` from :mod:`teskd.data.imagefolder`) plus one import line in
``teskd/data/__init__.py`` (the registry's built-ins), or a ``TESKD_PLUGINS`` module.

A dataset that fits in memory gives ``load`` (its splits as :class:`ImageArrays`); the pipeline
selects the splits and wraps them in in-memory loaders. Any other dataset gives ``build_splits``,
which returns the loaders itself (see :func:`teskd.data.pipeline.build_data` for its arguments).
No caller asks which kind a dataset is: it asks the spec (class count, sizes, preprocessing, checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from teskd.data.arrays import ImageArrays
from teskd.registry import Registry

if TYPE_CHECKING:
    from teskd.config import DataConfig
    from teskd.data.bundle import DataBundle


@dataclass(frozen=True)
class Preprocessing:
    """How a deployed network's images are fed, as an export records it (:class:`DeployInfo`): the shorter side
    resized to ``resize`` (bilinear, antialiased), centre-cropped to ``input_size``, ``(x/255 - mean) / std``."""

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int | None  # None: as many as the data holds (``class_names`` counts them)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int  # the training crop (a dataset with ``sizes`` may let data.image_size change it)
    load: Callable[..., ImageArrays] | None = None  # load(root, train: bool, download: bool) -> ImageArrays
    # build_splits(cfg: DataConfig, splits: tuple[str, ...], root: Path, *, device, seed, rank, world_size)
    #   -> DataBundle: the asked-for splits' loaders (None for the others), num_classes and classes
    build_splits: Callable[..., DataBundle] | None = None
    # class_names(cfg: DataConfig) -> the class names in label order, read from the data (needed when
    # num_classes is None)
    class_names: Callable[[DataConfig], list[str]] | None = None
    # sizes(cfg: DataConfig, spec) -> (crop, eval_resize) of evaluation; None: (image_size, image_size), the
    # arrays as they are
    sizes: Callable[[DataConfig, DatasetSpec], tuple[int, int]] | None = None
    # minutes between mid-epoch checkpoints when train.checkpoint_minutes is null; None: 0 (epochs of
    # seconds: checkpoints at epoch ends) for in-memory data, 30 for data read from files while training
    checkpoint_minutes: float | None = None

    def __post_init__(self):
        if self.load is None and self.build_splits is None:
            raise ValueError(f"dataset {self.name!r} needs load or build_splits")
        if self.num_classes is None and self.class_names is None:
            raise ValueError(f"dataset {self.name!r} needs num_classes or class_names")
        if self.checkpoint_minutes is None:
            object.__setattr__(self, "checkpoint_minutes", 0.0 if self.load is not None else 30.0)

    def class_count(self, cfg: DataConfig) -> int:
        """The number of classes: fixed by the dataset, or counted in the data ``cfg`` names."""
        return self.num_classes if self.num_classes is not None else len(self.class_names(cfg))

    def image_sizes(self, cfg: DataConfig) -> tuple[int, int]:
        """``(crop, eval_resize)``: the network's input size and the shorter side before the centre crop."""
        return self.sizes(cfg, self) if self.sizes is not None else (self.image_size, self.image_size)

    def input_size(self, cfg: DataConfig) -> int:
        return self.image_sizes(cfg)[0]

    def preprocessing(self, cfg: DataConfig) -> Preprocessing:
        """The evaluation preprocessing of a run of ``cfg``: what its exports tell a deployer to do."""
        size, resize = self.image_sizes(cfg)
        return Preprocessing(size, resize, tuple(self.mean), tuple(self.std))


DATASETS: Registry[DatasetSpec] = Registry("dataset", "teskd.data", "known datasets")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name)(spec)


def get_dataset_spec(name: str) -> DatasetSpec:
    return DATASETS.get(name)
