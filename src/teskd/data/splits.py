"""Per-class subsets and validation hold-outs, for any labelled dataset (file order kept)."""

from __future__ import annotations

import torch

from teskd.data.arrays import ImageArrays
from teskd.errors import TeskdError


def _rank_in_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, its index within its class in file order; and the per-class counts."""
    labels = labels.to(torch.int64).cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise TeskdError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes)
    order = torch.sort(labels, stable=True).indices  # file order kept within each class
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each class
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - starts[labels[order]]
    return rank, counts


def _too_few(action: str, counts: torch.Tensor, short: torch.Tensor) -> TeskdError:
    """The error for classes (``short``, a boolean mask) with too few images to ``action``."""
    classes = short.nonzero().flatten().tolist()
    shown = ", ".join(f"class {c} has {int(counts[c])}" for c in classes[:5])
    more = f" and {len(classes) - 5} more" if len(classes) > 5 else ""
    return TeskdError(f"cannot {action}: {len(classes)} classes have fewer ({shown}{more})")


def first_k_per_class(labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Indices (ascending, int64) of the first ``k`` images of each class in file order."""
    if k < 0:
        raise TeskdError(f"the number of images per class must be >= 0, got {k}")
    rank, counts = _rank_in_class(labels, num_classes)
    if (counts < k).any():
        raise _too_few(f"take {k} images per class", counts, counts < k)
    return (rank < k).nonzero().flatten()


def split_val_per_class(arrays: ImageArrays, val_per_class: int) -> tuple[ImageArrays, ImageArrays | None]:
    """``(train, val)`` in file order, val the last ``val_per_class`` images of each class (None for 0);
    classes with no images are ignored, one with fewer than ``val_per_class`` is an error."""
    if val_per_class < 0:
        raise TeskdError(f"val_per_class must be >= 0, got {val_per_class}")
    if val_per_class == 0:
        return arrays, None
    labels = arrays.labels.cpu()
    num_classes = max(len(arrays.classes), int(labels.max()) + 1 if labels.numel() else 0)
    rank, counts = _rank_in_class(labels, num_classes)
    short = (counts > 0) & (counts < val_per_class)
    if short.any():
        raise _too_few(f"hold out {val_per_class} validation images per class", counts, short)
    is_val = rank >= counts[labels] - val_per_class
    return arrays.select(torch.nonzero(~is_val).flatten()), arrays.select(torch.nonzero(is_val).flatten())
