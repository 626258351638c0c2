"""In-memory image datasets: one uint8 tensor of images plus int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageArrays:
    images: torch.Tensor  # uint8, (N, 3, H, W), contiguous
    labels: torch.Tensor  # int64, (N,)
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> "ImageArrays":
        return ImageArrays(self.images[index].contiguous(), self.labels[index].contiguous(), self.classes)
