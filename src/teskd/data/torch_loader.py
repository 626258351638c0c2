"""A loader over a map-style dataset too large for memory, read by ``DataLoader`` workers in the
sample order of :mod:`teskd.data.loader`. Each sample's transform draws from torch's CPU generator
seeded from ``(seed, epoch, index)``: batches do not depend on the workers, and resuming is exact."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from teskd.data.loader import Batch, ShardedEpochs, derive_seed


class _SeededSamples(Dataset):
    """``dataset`` read by ``(epoch, index)`` keys, each sample's transform under its own seed. The epoch
    is in the key because persistent workers hold copies made before later ``set_epoch`` calls."""

    def __init__(self, dataset: Dataset, transform: Callable | None, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # Seeds the CPU generator only (torch.manual_seed would reseed CUDA too), and restores it
        # afterwards: with num_workers=0 this runs in the training process.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, epoch, index))
            image, label = self.dataset[index]
            if self.transform is not None:
                image = self.transform(image)
        return image, int(label), index


class _BatchKeys(Sampler):
    """The batch sampler: this epoch's batches of ``(epoch, index)`` keys from batch ``start`` on."""

    def __init__(self, loader: TorchLoader):
        self.loader, self.start = loader, 0

    def __iter__(self):
        loader, b = self.loader, self.loader.batch_size
        order = loader.order().tolist()
        for i in range(self.start, len(loader)):
            yield [(loader.epoch, index) for index in order[i * b:(i + 1) * b]]

    def __len__(self) -> int:
        return max(len(self.loader) - self.start, 0)


class TorchLoader(ShardedEpochs):
    """Yields :class:`Batch` es from ``dataset[i] -> (image, label)`` on ``device``.

    ``transform(image) -> tensor`` runs in the workers and must draw from torch's global generator
    (torchvision's transforms do). Returning uint8 and normalising on the device (``device_transform``,
    e.g. :func:`~teskd.data.augment.normalize`) moves a quarter of the bytes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 device: torch.device | str, transform: Callable | None = None,
                 device_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool | None = None,
                 persistent_workers: bool = False, prefetch_factor: int | None = None):
        super().__init__(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.device_transform = device_transform
        self._keys = _BatchKeys(self)
        workers = num_workers > 0
        self._loader = DataLoader(
            _SeededSamples(dataset, transform, self.seed), batch_sampler=self._keys, num_workers=num_workers,
            pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory,
            persistent_workers=persistent_workers and workers, prefetch_factor=prefetch_factor if workers else None,
            generator=torch.Generator())  # its worker seeds (unused) are then not drawn from the global generator

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        self._check_start(step)
        self._keys.start = step
        for images, labels, index in self._loader:
            images, labels, index = (t.to(self.device, non_blocking=True) for t in (images, labels, index))
            if self.device_transform is not None:
                images = self.device_transform(images)
            yield Batch(images, labels, index)
