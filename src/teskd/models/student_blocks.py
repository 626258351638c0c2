"""The building blocks of TESKD's students (``students.py``): the laterals and fuses, the upsampling and the
faithful auxiliary branch, as ``nn.Sequential``s whose layer indices are the official state-dict keys.
The exact fast rewrites (``students_fast.py``) read their layers by the names given here."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.models.student_branches import PatchBranch


def _layer(index: int) -> property:
    """A Sequential's layer by name; the indices stay, as they are the official state-dict keys."""
    return property(lambda self: self[index])


class ConvBNReLU(nn.Sequential):
    """0: 1x1 conv without bias, 1: BN, 2: ReLU (the laterals and fuses)."""

    conv, bn = _layer(0), _layer(1)

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class UpsampleBlock(nn.Sequential):
    """0: bilinear x ``scale`` (align_corners), 1: 1x1 conv without bias, 2: BN, 3: ReLU.

    Called with ``size`` (the next shallower stage's map size), it upsamples to exactly that size;
    ``scale`` is the nominal ratio, the same result wherever the sizes are ``scale``-fold.
    """

    up, conv, bn = _layer(0), _layer(1), _layer(2)

    def __init__(self, in_ch: int, out_ch: int, scale: int):
        super().__init__(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True),
                         nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())

    def resize(self, x: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
        """Layer 0 (bilinear, align_corners) to ``size``, or by the nominal scale if ``size`` is None."""
        if size is None:
            return self.up(x)
        return F.interpolate(x, size=tuple(size), mode=self.up.mode, align_corners=self.up.align_corners)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        return self[3](self.bn(self.conv(self.resize(x, size))))


class AuxiliaryBranch(PatchBranch):
    """0: k x k stride-k conv, 1: BN, 2: ReLU, 3: 1x1 conv, 4: BN, 5: ReLU (both convs with bias).

    Its input is zero-padded at the bottom and right to a multiple of k (``PatchBranch``; none
    where k divides the size, as in the official code)."""

    conv1, bn1, conv2, bn2 = _layer(0), _layer(1), _layer(3), _layer(4)

    def __init__(self, width: int, kernel: int):
        super().__init__(nn.Conv2d(width, width, kernel_size=kernel, stride=kernel), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, kernel_size=1), nn.BatchNorm2d(width), nn.ReLU())
