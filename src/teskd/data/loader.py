"""What the engine needs from a loader, and the sample order every loader follows.

All randomness of an epoch derives from ``(seed, epoch)``, so ``iter_from(step)`` resumes an epoch
exactly. With several ranks each takes its shard of the same permutation, as ``DistributedSampler``
does: a shuffled (training) order is padded by wrapping around so all ranks run the same number of
steps; an unshuffled (evaluation) order is not, so each sample is evaluated exactly once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from teskd.errors import TeskdError


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, 3, H, W)
    labels: torch.Tensor  # int64 (B,)
    index: torch.Tensor  # int64 (B,): the samples' dataset indices, on the labels' device


# how a method may ask for its training batches to be extended: each batch of B samples followed by B
# partners, one per sample ("same_class": a random sample of the same class, possibly itself)
PAIRINGS = ("same_class",)


@runtime_checkable
class Loader(Protocol):
    batch_size: int  # per rank

    @property
    def num_samples(self) -> int: ...  # the samples this rank sees per epoch

    @property
    def dataset_size(self) -> int: ...  # the samples of the whole split (all ranks together)

    def pair_batches(self, pairing: str) -> None:
        """From now on follow each batch with partners as ``pairing`` (one of :data:`PAIRINGS`) says."""

    def __len__(self) -> int: ...  # the batches per epoch for this rank

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        """This epoch from batch ``step`` on, identical to the rest of a full pass."""

    def __iter__(self) -> Iterator[Batch]: ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hash-mixed, so nearby inputs give unrelated streams)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


class ShardedEpochs:
    """The epoch bookkeeping (order, shard, lengths) of a loader over ``size`` samples."""

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                 rank: int, world_size: int):
        if batch_size < 1:
            raise TeskdError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise TeskdError(f"rank must lie in 0..world_size-1, got rank {rank} of world size {world_size}")
        self.size, self.batch_size = int(size), int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._classes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # same-class pairing

    def pair_same_class(self, labels: torch.Tensor) -> None:
        """From now on each batch of B samples is followed by B partners: for sample i (at i + B), a random
        sample of the same class, possibly itself (CS-KD's pair sampler). ``labels``: every sample's class."""
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if labels.shape != (self.size,):
            raise TeskdError(f"pairing needs one label per sample ({self.size}), got shape {tuple(labels.shape)}")
        members = torch.argsort(labels, stable=True)  # sample indices grouped by class
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
        starts = torch.cumsum(counts, 0) - counts
        self._classes = (labels, members, torch.stack([starts, counts]))

    @property
    def dataset_size(self) -> int:
        return self.size

    def pair_batches(self, pairing: str) -> None:
        if pairing not in PAIRINGS:
            raise TeskdError(f"unknown batch pairing {pairing!r}; known: {', '.join(PAIRINGS)}")
        self.pair_same_class()  # the loaders know their labels

    def batch_indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """The dataset indices of batch ``step`` of ``order`` (CPU), with same-class partners when pairing."""
        index = order[step * self.batch_size:(step + 1) * self.batch_size]
        if self._classes is None:
            return index
        labels, members, (starts, counts) = self._classes
        parts = (self.seed, self.epoch, step, 0x9A1D) + ((self.rank,) if self.world_size > 1 else ())
        draw = torch.rand(index.shape[0], generator=seeded_generator(derive_seed(*parts)), dtype=torch.float64)
        cls = labels[index.cpu()]
        pick = starts[cls] + (draw * counts[cls]).long().clamp_max(counts[cls] - 1)
        return torch.cat([index, members[pick].to(index.device)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order (CPU int64)."""
        if not self.shuffle:
            return torch.arange(self.rank, self.size, self.world_size)
        order = torch.randperm(self.size, generator=seeded_generator(derive_seed(self.seed, self.epoch)))
        padded = self._shard_size() * self.world_size
        if padded > self.size:  # wrap around (repeatedly, if size < world_size) as DistributedSampler does
            order = order.repeat(-(-padded // self.size))[:padded]
        return order[self.rank::self.world_size]

    def _shard_size(self) -> int:
        if self.shuffle:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        n, b = self._shard_size(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self._shard_size()

    def _check_start(self, step: int) -> None:
        if step < 0:
            raise TeskdError(f"start batch must be >= 0, got {step}")

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
