"""Image-folder datasets: ``root/train/<class>/*.jpg`` (or another of :data:`IMAGE_SUFFIXES`) for training
(``data.val_per_class`` may hold some out) and ``root/val/<class>/*`` as the test split; ``imagefolder`` takes any
number of classes, ``imagenet`` expects its 1000.

The files are listed once (:mod:`teskd.data.listing`: class folders in sorted order, hidden names skipped, each
directory visited once), read and decoded to uint8 RGB in DataLoader workers within bounds (:mod:`teskd.data.decode`:
regular files only, size and pixel limits), cropped there under :class:`TorchLoader`'s per-sample seeds
(training: ``RandomResizedCrop`` + flip; evaluation: ``Resize`` + ``CenterCrop``) and normalised on the
training device. An unreadable file comes back as a :class:`BadSample` naming it (``data.on_bad_image``).
torchvision is imported where it is used: importing ``teskd.data`` (CIFAR runs too) stays quick.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from teskd.config import DataConfig, resolve_data_root
from teskd.data.augment import normalize
from teskd.data.center_crop import resize_center_crop
from teskd.data.decode import IMAGE_SUFFIXES, BadImage, read_rgb
from teskd.data.listing import class_folders, list_files
from teskd.data.bundle import DataBundle
from teskd.data.pipeline import select_splits
from teskd.data.registry import DatasetSpec, get_dataset_spec, register_dataset
from teskd.data.torch_loader import BadSample, TorchLoader
from teskd.errors import TeskdError, printable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SIZE = 224  # and 256 (= 224 * 8 / 7) before the evaluation centre crop
_PREFETCH = 4  # batches in flight per worker
_LAYOUT = "{root}/train/<class>/*.jpg (or " + ", ".join(IMAGE_SUFFIXES[1:]) + ") and {root}/val/<class>/*"


@dataclass
class ImageFiles:
    """A split's labelled file list. Paths are kept as one bytes array (relative to ``folder``): workers
    forked from the training process then share it instead of copying a million Python strings."""

    folder: str
    names: np.ndarray  # bytes (N,): os.fsencode of each path relative to folder
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.names[index]))

    def select(self, index: torch.Tensor) -> ImageFiles:
        return ImageFiles(self.folder, self.names[index.cpu().numpy()], self.labels[index], self.classes)


def _no_data(name: str, root: Path, cfg: DataConfig | None = None) -> TeskdError:
    why = "the folder does not exist" if not root.exists() else "it has no train or val folder"
    note = "; data.download does not apply to image folders" if cfg is not None and cfg.download else ""
    return TeskdError(f"no {name} data found at {root} ({why}); expected {_LAYOUT.format(root=root)}; "
                      f"point data.root at the data{note}")


def _class_folders(folder: Path, name: str) -> list[str]:
    try:
        classes = class_folders(str(folder))
    except OSError as err:
        raise TeskdError(f"cannot list {printable(folder)} ({' '.join(str(err.strerror or err).split())})") from err
    if not classes:
        hint = " (ImageNet's flat validation images must first be sorted into class folders)" \
            if name == "imagenet" and folder.name == "val" else ""
        raise TeskdError(f"{printable(folder)} holds no class folders; expected one folder of images per class, "
                         f"{printable(folder)}/<class>/*.jpg{hint}")
    return classes


def find_image_classes(root: Path, name: str, expected: int | None, cfg: DataConfig | None = None) -> list[str]:
    """The class names in label order: ``root/train``'s class folders (``root/val``'s without a train folder)."""
    folder = next((root / s for s in ("train", "val") if (root / s).is_dir()), None)
    if folder is None:
        raise _no_data(name, root, cfg)
    classes = _class_folders(folder, name)
    if expected is not None and len(classes) != expected:
        raise TeskdError(f"{name} at {root} should have {expected} class folders in {folder}, found "
                         f"{len(classes)}; use data.dataset=imagefolder for another number of classes")
    return classes


def list_images(root: Path, split: str, classes: list[str], name: str) -> ImageFiles:
    """The images of ``root/<split>`` (``train`` or ``val``), labelled by ``classes``."""
    folder = root / split
    if not folder.is_dir():
        role = "training images" if split == "train" else "test split"
        raise TeskdError(f"{folder} does not exist; the {role} of {name} {'are' if split == 'train' else 'is'} "
                         f"read from it (expected {_LAYOUT.format(root=root)})")
    present = _class_folders(folder, name)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise TeskdError(f"{folder} has {len(unknown)} class folder(s) that {root / 'train'} lacks "
                         f"({', '.join(map(printable, unknown[:5]))}{', ...' if len(unknown) > 5 else ''})")
    label = {c: i for i, c in enumerate(classes)}
    listing = list_files(str(folder), {c: label[c] for c in present}, IMAGE_SUFFIXES)
    names = np.array([os.fsencode(p) for p in listing.names], dtype=bytes)
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    return ImageFiles(str(folder), names, labels, classes)


class FolderImages(Dataset):
    """``files[i] -> (uint8 (3, H, W), label)``, or ``(BadSample, label)`` for a file that cannot be read."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        """Every sample's class, without reading an image (for same-class pairing)."""
        return torch.as_tensor(np.asarray(self.files.labels), dtype=torch.int64)

    def __getitem__(self, index: int):
        path, label = self.files.path(index), int(self.files.labels[index])
        try:
            return read_rgb(path), label
        except BadImage as err:
            return BadSample(path, err.reason), label


def image_sizes(cfg: DataConfig, spec: DatasetSpec) -> tuple[int, int]:
    """``(crop, eval_resize)``: data.image_size (else the dataset's), data.eval_resize (else crop * 8/7)."""
    size = cfg.image_size or spec.image_size
    resize = cfg.eval_resize or round(size * 8 / 7)
    if resize < size:
        raise TeskdError(f"data.eval_resize={resize} is smaller than the crop data.image_size={size}; "
                         f"the evaluation centre crop must fit in the resized image")
    return size, resize


def train_transform(size: int, hflip: bool, autoaugment: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    flip = [v2.RandomHorizontalFlip()] if hflip else []
    auto = [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)] if autoaugment else []
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), *flip, *auto])


eval_transform = resize_center_crop  # (size, resize) -> uint8 image transform; the former name


@dataclass(frozen=True)
class FolderTransforms:
    """An image-folder dataset's per-sample transforms (uint8 (3, H, W) -> uint8 (3, crop, crop)), run in the
    loader's workers. ``evaluation`` must be what the spec's ``sizes`` say (resize the shorter side, centre crop):
    exports record those sizes as the preprocessing a deployer applies."""

    train: Callable[..., Callable] = field(default=train_transform)  # (size, hflip, autoaugment) -> transform
    evaluation: Callable[..., Callable] = field(default=resize_center_crop)  # (size, resize) -> transform


def _loader(files: ImageFiles | None, training: bool, cfg: DataConfig, spec: DatasetSpec, transforms: FolderTransforms,
            device, seed: int, rank: int, world_size: int) -> TorchLoader | None:
    if files is None:
        return None
    size, resize = spec.image_sizes(cfg)
    return TorchLoader(
        FolderImages(files), cfg.batch_size if training else cfg.eval_batch_size, shuffle=training,
        drop_last=False, device=device,
        transform=transforms.train(size, cfg.hflip, cfg.autoaugment) if training else transforms.evaluation(size, resize),
        device_transform=partial(normalize, mean=spec.mean, std=spec.std), seed=seed, rank=rank,
        world_size=world_size, num_workers=cfg.workers, persistent_workers=True, prefetch_factor=_PREFETCH,
        on_bad_sample=cfg.on_bad_image)


def build_folder_splits(cfg: DataConfig, splits: Collection[str], root: Path, *, device, seed: int,
                        rank: int = 0, world_size: int = 1, transforms: FolderTransforms = FolderTransforms()
                        ) -> DataBundle:
    """The ``build_splits`` of an image-folder dataset (see :class:`DatasetSpec`)."""
    spec = get_dataset_spec(cfg.dataset)
    spec.image_sizes(cfg)  # a bad size is reported before the (slow) listing
    if cfg.cutout:
        raise TeskdError(f"data.cutout is implemented for in-memory datasets (CIFAR), not for {cfg.dataset}; "
                         f"set data.cutout=0")
    classes = find_image_classes(root, cfg.dataset, spec.num_classes, cfg)
    read = lambda train: list_images(root, "train" if train else "val", classes, cfg.dataset)  # noqa: E731
    train, val, test = select_splits(cfg, splits, root, read, len(classes))
    make = partial(_loader, cfg=cfg, spec=spec, transforms=transforms, device=device, seed=seed, rank=rank,
                   world_size=world_size)
    return DataBundle(train=make(train, True), val=make(val, False), test=make(test, False),
                      num_classes=len(classes), classes=classes)


def folder_classes(cfg: DataConfig) -> list[str]:
    """The ``class_names`` of an image-folder dataset: its class folders, in label order."""
    return find_image_classes(resolve_data_root(cfg), cfg.dataset, get_dataset_spec(cfg.dataset).num_classes, cfg)


def folder_dataset(name: str, num_classes: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   image_size: int = _IMAGE_SIZE, transforms: FolderTransforms = FolderTransforms(),
                   sizes: Callable[[DataConfig, DatasetSpec], tuple[int, int]] = image_sizes,
                   checkpoint_minutes: float = 30.0) -> DatasetSpec:
    """The spec of a dataset in the image-folder layout (``num_classes`` None: any number of class folders).
    ``sizes`` gives evaluation's ``(crop, resize)`` and must agree with ``transforms.evaluation``."""
    return DatasetSpec(name, num_classes, tuple(mean), tuple(std), image_size,
                       build_splits=partial(build_folder_splits, transforms=transforms), class_names=folder_classes,
                       sizes=sizes, checkpoint_minutes=checkpoint_minutes)


register_dataset(folder_dataset("imagefolder"))
register_dataset(folder_dataset("imagenet", 1000))
