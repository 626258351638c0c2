"""The evaluation preprocessing every teskd export describes: shorter side resized, centre crop.

One definition, used by image-folder evaluation and by :class:`teskd.deploy.preprocess.Preprocess`, so a
prediction on a saved test image equals the evaluated one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def resize_center_crop(size: int, resize: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> uint8 (3, size, size): the shorter side to ``resize`` (bilinear, antialiased), then the
    centre ``size`` x ``size``. torchvision is imported here, where it is used."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
