"""A loader for datasets that fit in device memory: each batch is a gather from the uint8 image
tensor on the training device plus a batched augmentation (no workers, no per-image work)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from teskd.data.arrays import ImageArrays
from teskd.data.loader import Batch, ShardedEpochs, derive_seed, seeded_generator
from teskd.errors import TeskdError


class InMemoryLoader(ShardedEpochs):
    """Yields :class:`Batch` es (images float32 (B, 3, H, W), labels, index) on ``device``.

    ``transform`` is either a random transform with ``uses_generator = True`` (such as
    :class:`~teskd.data.augment.BatchAugment`), called as ``transform(x, generator)`` with a
    CPU generator seeded from (seed, epoch, batch) -- and the rank, with several ranks -- or
    a deterministic callable ``transform(x)``.
    """

    def __init__(self, arrays: ImageArrays, batch_size: int, *, shuffle: bool, drop_last: bool,
                 transform: Callable, device: torch.device | str, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if arrays.images.dtype != torch.uint8 or arrays.images.dim() != 4:
            raise TeskdError(f"InMemoryLoader expects uint8 images (N, C, H, W), "
                             f"got {arrays.images.dtype} {tuple(arrays.images.shape)}")
        if arrays.labels.shape != (arrays.images.shape[0],):
            raise TeskdError(f"{arrays.images.shape[0]} images but labels of shape {tuple(arrays.labels.shape)}")
        super().__init__(len(arrays), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.images = arrays.images.to(self.device).contiguous()
        self.labels = arrays.labels.to(self.device, torch.int64)
        self.transform = transform

    def pair_same_class(self, labels: torch.Tensor | None = None) -> None:
        super().pair_same_class(self.labels if labels is None else labels)

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """The CPU generator for batch ``batch_index``'s augmentation in this epoch."""
        parts = (self.seed, self.epoch, batch_index)
        if self.world_size > 1:  # each rank augments its own batches; one rank keeps the 1-process stream
            parts += (self.rank,)
        return seeded_generator(derive_seed(*parts))

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        self._check_start(step)
        order = self.order().to(self.device)  # the whole epoch's order, drawn up front
        contiguous = not self.shuffle and self.world_size == 1  # slices instead of gathers
        random_transform = getattr(self.transform, "uses_generator", False)
        if self._classes is not None:
            contiguous = False
        for i in range(step, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, order.shape[0])
            index = self.batch_indices(order, i)
            if contiguous:
                images, labels = self.images[lo:hi], self.labels[lo:hi]
            else:
                images, labels = self.images[index], self.labels[index]
            images = self.transform(images, self.batch_generator(i)) if random_transform else self.transform(images)
            yield Batch(images, labels, index)
