"""A loader over a map-style dataset too large for memory, read by ``DataLoader`` workers in the
sample order of :mod:`teskd.data.loader`. Each sample's transform draws from torch's CPU generator
seeded from ``(seed, epoch, index)``: batches do not depend on the workers, and resuming is exact.

A dataset returns a :class:`BadSample` in place of an image it cannot read (a worker's exception would
reach the training process as a multi-line traceback); the loader then stops with a one-line error
naming the file, or drops the sample from its batch, counts it and warns once per pass."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from teskd.data.loader import Batch, ShardedEpochs, derive_seed
from teskd.errors import TeskdError, printable
from teskd.log import log

BAD_SAMPLE_POLICIES = ("stop", "skip")


class BadSample(NamedTuple):
    """What a dataset returns, as the image, for a sample it cannot read."""

    source: str  # the file, for messages
    reason: str  # one line


def _collate(samples: list) -> tuple:
    """``(images, labels, index, bad)``: the readable samples stacked, and ``[(index, BadSample)]``."""
    good = [s for s in samples if not isinstance(s[0], BadSample)]
    bad = [(index, image) for image, _, index in samples if isinstance(image, BadSample)]
    if not good:
        nothing = torch.empty(0, dtype=torch.int64)
        return nothing, nothing, nothing, bad
    return (*default_collate(good), bad)


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
            if self.transform is not None and not isinstance(image, BadSample):
                image = self.transform(image)
        return image, int(label), index


class _BatchKeys(Sampler):
    """The batch sampler: this epoch's batches of ``(epoch, index)`` keys from batch ``start`` on.

    It refers to its loader weakly, and its iterators not at all: the loader owns the DataLoader, which
    keeps this sampler and (with persistent workers) a live iterator, so no cycle holds the workers.
    """

    def __init__(self, loader: TorchLoader):
        self._loader, self.start = weakref.ref(loader), 0

    def __iter__(self):
        loader = self._loader()
        return _keys(loader, loader.order(), self.start, len(loader))

    def __len__(self) -> int:
        return max(len(self._loader()) - self.start, 0)


def _keys(loader: TorchLoader, order: torch.Tensor, start: int, steps: int) -> Iterator[list]:
    epoch = loader.epoch
    for i in range(start, steps):
        yield [(epoch, index) for index in loader.batch_indices(order, i).tolist()]


def _stop_workers(loader: DataLoader) -> None:
    """Shuts persistent workers down while their queues still work. When the garbage collector frees a
    cycle holding the DataLoader, it closes the queues before the iterator's own shutdown, which then
    waits out a 5 s timeout per worker and kills it; this finaliser keeps the DataLoader out of the cycle."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


class TorchLoader(ShardedEpochs):
    """Yields :class:`Batch` es from ``dataset[i] -> (image, label)`` on ``device``.

    ``transform(image) -> tensor`` runs in the workers and must draw from torch's global generator
    (torchvision's transforms do). Returning uint8 and normalising on the device (``device_transform``,
    e.g. :func:`~teskd.data.augment.normalize`) moves a quarter of the bytes. ``on_bad_sample`` says what
    a :class:`BadSample` does: ``stop`` raises, ``skip`` drops it (``skipped`` lists this pass's).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 device: torch.device | str, transform: Callable | None = None,
                 device_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool | None = None,
                 persistent_workers: bool = False, prefetch_factor: int | None = None,
                 on_bad_sample: str = "stop"):
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise TeskdError(f"on_bad_sample must be stop or skip, got {on_bad_sample!r}")
        super().__init__(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.device_transform = device_transform
        self.on_bad_sample = on_bad_sample
        self.skipped: list[BadSample] = []  # this pass's skipped samples
        self._keys = _BatchKeys(self)
        workers = num_workers > 0
        self._loader = DataLoader(
            _SeededSamples(dataset, transform, self.seed), batch_sampler=self._keys, num_workers=num_workers,
            pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory,
            persistent_workers=persistent_workers and workers, prefetch_factor=prefetch_factor if workers else None,
            collate_fn=_collate,
            generator=torch.Generator())  # its worker seeds (unused) are then not drawn from the global generator
        weakref.finalize(self, _stop_workers, self._loader).atexit = False  # at exit torch's own handling

    def pair_same_class(self, labels: torch.Tensor | None = None) -> None:
        if labels is None:
            labels = getattr(self._loader.dataset.dataset, "labels", None)
            if labels is None:
                raise TeskdError("this dataset does not list its labels, which same-class pairing needs")
        super().pair_same_class(labels)

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        self._check_start(step)
        self._keys.start = step
        self.skipped = []
        try:
            for i, (images, labels, index, bad) in enumerate(self._loader, start=step):
                if bad:
                    self._bad_samples(bad, i, len(index))
                yield self._on_device(images, labels, index)
        finally:
            self._report_skipped()

    def _on_device(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> Batch:
        images, labels, index = (t.to(self.device, non_blocking=True) for t in (images, labels, index))
        if self.device_transform is not None:
            images = self.device_transform(images)
        return Batch(images, labels, index)

    def _bad_samples(self, bad: list[tuple[int, BadSample]], step: int, kept: int) -> None:
        first = bad[0][1]
        if self.on_bad_sample == "stop":
            raise TeskdError(f"cannot read {printable(first.source)}: {first.reason}; fix or remove the file, or set "
                             f"data.on_bad_image=skip to skip unreadable images")
        self.skipped += [sample for _, sample in bad]
        if kept == 0:  # an empty step would desynchronise the ranks and the resume position
            raise TeskdError(f"every image of batch {step} of epoch {self.epoch + 1} is unreadable (the first: "
                             f"{printable(first.source)}: {first.reason}); fix or remove the files")

    def _report_skipped(self) -> None:
        if self.skipped:
            n, first = len(self.skipped), self.skipped[0]
            log.warning(f"warning: skipped {n} unreadable image{'s' if n != 1 else ''} in epoch {self.epoch + 1} "
                        f"(the first: {printable(first.source)}: {first.reason})")
