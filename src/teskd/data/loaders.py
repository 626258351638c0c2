"""A DataLoader replacement for datasets that fit in (device) memory.

The whole uint8 image tensor lives on the training device; each batch is a gather
plus a batched augmentation, so there are no worker processes and no per-image work.
All randomness of an epoch derives from ``(seed, epoch)`` alone, which makes every
batch reproducible and lets a resumed run skip exactly the batches already seen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch

from teskd.data.arrays import ImageArrays
from teskd.errors import TeskdError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hash-mixed, so nearby inputs give unrelated streams)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


class InMemoryLoader:
    """Yields ``(images float32 (B, 3, H, W), labels int64 (B,))`` on ``device``.

    ``transform`` is either a random transform with ``uses_generator = True`` (such as
    :class:`~teskd.data.augment.BatchAugment`), called as ``transform(x, generator)``
    with a CPU generator, or a deterministic callable ``transform(x)``.
    """

    def __init__(self, arrays: ImageArrays, batch_size: int, *, shuffle: bool, drop_last: bool,
                 transform: Callable, device: torch.device | str, seed: int = 0):
        if batch_size < 1:
            raise TeskdError(f"batch size must be >= 1, got {batch_size}")
        if arrays.images.dtype != torch.uint8 or arrays.images.dim() != 4:
            raise TeskdError(f"InMemoryLoader expects uint8 images (N, C, H, W), "
                             f"got {arrays.images.dtype} {tuple(arrays.images.shape)}")
        if arrays.labels.shape != (arrays.images.shape[0],):
            raise TeskdError(f"{arrays.images.shape[0]} images but labels of shape {tuple(arrays.labels.shape)}")
        self.device = torch.device(device)
        self.images = arrays.images.to(self.device).contiguous()
        self.labels = arrays.labels.to(self.device, torch.int64)
        self.classes = arrays.classes
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor | None:
        """This epoch's sample order (CPU int64), or None when not shuffling."""
        if not self.shuffle:
            return None
        return torch.randperm(self.num_samples, generator=_generator(derive_seed(self.seed, self.epoch)))

    def batch_generator(self, batch_index: int) -> torch.Generator:
        """The CPU generator for batch ``batch_index``'s augmentation in this epoch."""
        return _generator(derive_seed(self.seed, self.epoch, batch_index))

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterates this epoch from batch ``start_batch``; later batches are identical to a full pass."""
        if start_batch < 0:
            raise TeskdError(f"start batch must be >= 0, got {start_batch}")
        order = self.permutation()  # the whole epoch's order, drawn up front
        if order is not None:
            order = order.to(self.device)
        random_transform = getattr(self.transform, "uses_generator", False)
        for i in range(start_batch, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)
            if order is None:
                images, labels = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                images, labels = self.images[idx], self.labels[idx]
            if random_transform:
                images = self.transform(images, self.batch_generator(i))
            else:
                images = self.transform(images)
            yield images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)
