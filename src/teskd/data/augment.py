"""Batched image augmentation that runs on the training device.

The whole batch is augmented with a few tensor operations (no per-image Python or
PIL work), so it costs little on a GPU and stays fast on a CPU. The random numbers
are always drawn on the CPU from a caller-supplied ``torch.Generator``; the same
generator state therefore gives the same augmented batch on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from teskd.errors import TeskdError


def _channel_stats(values: Sequence[float] | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1)
    if stats.numel() != 3:
        raise TeskdError(f"normalisation {name} must have 3 values (one per RGB channel), got {stats.numel()}")
    return stats.view(3, 1, 1)


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32; ``x`` is uint8 (B, 3, H, W) or (3, H, W)."""
    if x_uint8.dtype != torch.uint8:
        raise TeskdError(f"normalize expects uint8 images, got {x_uint8.dtype}")
    mean_t = _channel_stats(mean, "mean", x_uint8.device)
    std_t = _channel_stats(std, "std", x_uint8.device)
    return x_uint8.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


class BatchAugment:
    """Random crop with zero padding, random horizontal flip, then normalisation.

    Same semantics as torchvision's ``RandomCrop(crop, padding, fill=0)``,
    ``RandomHorizontalFlip(0.5)`` and ``Normalize(mean, std)`` applied to each image:
    the padding pixels are 0 in uint8 space, i.e. black before normalisation.
    """

    #: Loaders pass a ``torch.Generator`` to transforms that have this set.
    uses_generator = True

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop: int = 32, padding: int = 4,
                 flip: bool = True, autoaugment: bool = False, cutout: int = 0):
        if crop < 1:
            raise TeskdError(f"crop size must be >= 1, got {crop}")
        if padding < 0:
            raise TeskdError(f"crop padding must be >= 0, got {padding}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        _channel_stats(self.mean, "mean", torch.device("cpu"))
        _channel_stats(self.std, "std", torch.device("cpu"))
        self.crop = int(crop)
        self.padding = int(padding)
        self.flip = bool(flip)
        if cutout < 0:
            raise TeskdError(f"cutout size must be >= 0, got {cutout}")
        self.autoaugment, self.cutout = bool(autoaugment), int(cutout)

    def __repr__(self) -> str:
        return (f"BatchAugment(mean={self.mean}, std={self.std}, crop={self.crop}, "
                f"padding={self.padding}, flip={self.flip}, autoaugment={self.autoaugment}, cutout={self.cutout})")

    def draw(self, batch: int, height: int, width: int, generator: torch.Generator):
        """The random choices for a batch, on the CPU: crop tops, crop lefts (in padded
        coordinates) and flip flags, each of shape (batch,)."""
        max_top = height + 2 * self.padding - self.crop
        max_left = width + 2 * self.padding - self.crop
        if max_top < 0 or max_left < 0:
            raise TeskdError(f"cannot crop {self.crop}x{self.crop} from {height}x{width} images "
                             f"padded by {self.padding}")
        tops = torch.randint(0, max_top + 1, (batch,), generator=generator)
        lefts = torch.randint(0, max_left + 1, (batch,), generator=generator)
        if self.flip:
            flips = torch.rand(batch, generator=generator) < 0.5
        else:
            flips = torch.zeros(batch, dtype=torch.bool)
        return tops, lefts, flips

    def apply(self, x_uint8: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
              flips: torch.Tensor) -> torch.Tensor:
        """Crops/flips the uint8 batch with the given choices, then normalises it."""
        return normalize(self.crop_flip(x_uint8, tops, lefts, flips), self.mean, self.std)

    def crop_flip(self, x_uint8: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor,
                  flips: torch.Tensor) -> torch.Tensor:
        """The uint8 batch cropped and flipped with the given choices."""
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or x_uint8.shape[1] != 3:
            raise TeskdError(f"BatchAugment expects uint8 images of shape (B, 3, H, W), "
                             f"got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        device = x_uint8.device
        p, c = self.padding, self.crop
        padded = F.pad(x_uint8, (p, p, p, p)) if p > 0 else x_uint8  # zeros, still uint8

        # Index tensors: image b's output pixel (i, j) comes from padded row
        # tops[b] + i and padded column lefts[b] + j, or lefts[b] + (c - 1 - j) when
        # the image is flipped. Broadcasting batch (B,1,1,1), channel (1,3,1,1),
        # row (B,1,c,1) and column (B,1,1,c) indices gathers the whole batch at once.
        steps = torch.arange(c, device=device)
        tops, lefts, flips = tops.to(device), lefts.to(device), flips.to(device)
        rows = tops[:, None] + steps  # (B, c)
        cols = lefts[:, None] + torch.where(flips[:, None], c - 1 - steps, steps)  # (B, c)
        batch = torch.arange(x_uint8.shape[0], device=device)
        chans = torch.arange(3, device=device)
        out = padded[batch[:, None, None, None], chans[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        return out

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x_uint8`` (B, 3, H, W) on any device -> float32 (B, 3, crop, crop) on that device.

        ``generator`` must be a CPU generator; it alone decides the random choices.
        """
        if x_uint8.dim() != 4:
            raise TeskdError(f"BatchAugment expects a batch (B, 3, H, W), got shape {tuple(x_uint8.shape)}")
        b, _, h, w = x_uint8.shape
        tops, lefts, flips = self.draw(b, h, w, generator)
        if not (self.autoaugment or self.cutout):
            return self.apply(x_uint8, tops, lefts, flips)
        # the extras draw after the crop and flip choices, so those stay the same with or without them
        out = self.crop_flip(x_uint8, tops, lefts, flips)
        if self.autoaugment:
            out = auto_augment(out, generator)
        out = normalize(out, self.mean, self.std)
        if self.cutout:
            out = out * cutout_mask(b, self.crop, self.cutout, generator).to(out.device)
        return out


def auto_augment(x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's AutoAugment (CIFAR-10 policy) per image, each under a seed drawn from ``generator``."""
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    seeds = torch.randint(0, 2**62, (x_uint8.shape[0],), generator=generator)
    out = torch.empty_like(x_uint8)
    for i, seed in enumerate(seeds.tolist()):
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(seed)
            out[i] = policy(x_uint8[i])
    return out


def cutout_mask(batch: int, size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) float masks, 0 on a ``length`` square centred anywhere in the image (clipped at the
    border, as DeVries & Taylor's Cutout), 1 elsewhere."""
    centres = torch.randint(0, size, (2, batch), generator=generator)
    lo, hi = (centres - length // 2).clamp(0, size), (centres + length // 2).clamp(0, size)
    pos = torch.arange(size)
    inside_rows = (pos >= lo[0][:, None]) & (pos < hi[0][:, None])  # (B, size)
    inside_cols = (pos >= lo[1][:, None]) & (pos < hi[1][:, None])
    return (~(inside_rows[:, :, None] & inside_cols[:, None, :])).float()[:, None]
