"""Cheaper auxiliary branches for TESKD's students (not in the paper; ``method.student_branch``).

The faithful branch (``AuxiliaryBranch`` in ``student_blocks.py``, ``"conv"``) is a dense k x k,
stride-k convolution followed by a 1x1 one, both C -> C: C·C·k² + C² weights, which at the
faithful width (C = the last stage's channels) dominates the students. The branches here keep
the same contract, so they replace it module for module (same name ``downsample{L}``, input and
output width C, the map reduced k-fold to the branch stage's size, the head still
``Linear(C, classes)``):

* ``DepthwiseBranch`` (``"depthwise"``): the k x k stride-k convolution is depthwise
  (C·k² weights instead of C²·k²), then the same 1x1 C -> C convolution mixes the channels::

      0: Conv k x k / stride k, groups C, with bias   1: BN(C)  2: ReLU
      3: Conv 1x1 C -> C, with bias                    4: BN(C)  5: ReLU

* ``BottleneckBranch`` (``"bottleneck"``): a ResNet-style bottleneck with m = max(1, C // 4)
  hidden channels; the k x k stride-k convolution runs at width m (m²·k² weights)::

      0: Conv 1x1 C -> m   1: BN(m)  2: ReLU
      3: Conv k x k / stride k, m -> m   4: BN(m)  5: ReLU
      6: Conv 1x1 m -> C   7: BN(C)  8: ReLU                (no conv biases: each conv is followed by BN)

The fast students (``students_fast.py``) run these modules as they are.

Maps whose size is not a multiple of k (e.g. 7x7 at 112 px input; see ``students.py``): every
branch is a ``PatchBranch``, which zero-pads the input of its k x k stride-k convolution at the
bottom and right up to the next multiple of k (``pad_to_patches``). The patches are those of the
plain convolution, plus the partial ones at the edge that it would drop, so the output has
ceil(size / k) cells: no input position is lost, the map is never empty, and where k divides the
size nothing is padded (the official branch, exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` zero-padded at the bottom and right to height and width multiples of ``k`` (``x`` itself if they are)."""
    pad_h, pad_w = -x.shape[-2] % k, -x.shape[-1] % k
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class PatchBranch(nn.Sequential):
    """A Sequential whose layer ``patch_layer`` is the k x k stride-k convolution; its input is
    padded by ``pad_to_patches`` first, so sizes that k does not divide keep their edge cells."""

    patch_layer = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self):
            if index == self.patch_layer:
                x = pad_to_patches(x, layer.stride[0])
            x = layer(x)
        return x


class DepthwiseBranch(PatchBranch):
    """0: depthwise k x k stride-k conv, 1: BN, 2: ReLU, 3: 1x1 conv, 4: BN, 5: ReLU (both convs with bias)."""

    def __init__(self, width: int, kernel: int):
        super().__init__(
            nn.Conv2d(width, width, kernel_size=kernel, stride=kernel, groups=width), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


class BottleneckBranch(PatchBranch):
    """1x1 C -> m, k x k stride-k m -> m, 1x1 m -> C (m = max(1, C // 4)), each conv bias-free + BN + ReLU."""

    patch_layer = 3  # padded after the 1x1 conv + BN + ReLU: zeros there would not stay zeros

    def __init__(self, width: int, kernel: int):
        hidden = self.hidden_width(width)
        super().__init__(
            nn.Conv2d(width, hidden, kernel_size=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=kernel, stride=kernel, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, width, kernel_size=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    @staticmethod
    def hidden_width(width: int) -> int:
        """m, the bottleneck's inner width."""
        return max(1, width // 4)
