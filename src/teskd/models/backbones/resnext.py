"""CIFAR "ResNeXts" of the official TESKD code as 4-stage backbones.

The architecture and the module names follow the official TESKD code
(``classification/models/resnext_our.py``), so the backbone part of an official state
dict loads into these modules unchanged. Official layout::

    conv1     Sequential(0: Conv2d 3x3, 3 -> 64, stride 1, pad 1, no bias)  # a Sequential!
    bn1       BatchNorm2d(64), then ReLU                                   # no max-pool
    layer1 .. layer4   Sequential of blocks (strides 1, 2, 2, 2)          -> T1 .. T4
    global average pool -> fc (Linear(512 x expansion, classes))           # the teacher head

Blocks (``layerN.{b}``; all convs without bias, the shortcut is
``downsample`` = Sequential(0: Conv 1x1 with stride, no bias, 1: BatchNorm2d) when the
shape changes, otherwise the identity with no module, as ``downsample=None`` there):

* ResNeXt-18/34 use a plain, NON-grouped BasicBlock (expansion 1) whose first conv is
  twice as wide: ``conv1`` 3x3 in -> 2 planes (stride), ``bn1``, ReLU, ``conv2`` 3x3
  2 planes -> planes, ``bn2``, add, ReLU. This is exactly
  :class:`teskd.models.backbones._layers.BasicBlock` with ``mid_ch = 2 x out_ch``.
* ResNeXt-50 uses a grouped Bottleneck (expansion 4, 32 groups, width 2 planes):
  ``conv1`` 1x1 in -> 2 planes, ``bn1``, ReLU, ``conv2`` 3x3 2 planes -> 2 planes,
  groups 32, stride, ``bn2``, ReLU, ``conv3`` 1x1 2 planes -> 4 planes, ``bn3``, add, ReLU.

Example keys: ``conv1.0.weight``, ``bn1.running_var``, ``layer1.0.conv1.weight``,
``layer1.0.bn2.bias``, ``layer2.0.downsample.0.weight``,
``layer2.0.downsample.1.running_mean``, ``layer1.0.conv3.weight`` (ResNeXt-50),
``fc.weight``, ``fc.bias``.

Initialisation as in the official code: every conv weight ~ N(0, 2 / (k*k*out_channels))
(He, fan-out), BN weight 1 and bias 0; the Linear head keeps PyTorch's default.

``width_mult`` scales every channel count c to ``scale_channels(c, width_mult)``. The
grouped conv keeps 32 groups whenever its scaled width is divisible by 32 (true for
width_mult 1, 0.5, 0.25); otherwise it uses the largest divisor of the width that is
at most 32.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teskd.models.backbones._layers import BasicBlock, Bottleneck, add_resnet_stages, conv3x3, scale_channels
from teskd.models.backbones.base import Backbone
from teskd.models.registry import register_backbone

CARDINALITY = 32


def _init_official_resnext(module: nn.Module) -> None:
    """Official ResNeXt init: He (fan-out) normal convs, BN weight 1 / bias 0; conv biases and Linear untouched."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def group_count(channels: int, cardinality: int = CARDINALITY) -> int:
    """The largest divisor of ``channels`` that does not exceed ``cardinality``."""
    return max(g for g in range(1, min(channels, cardinality) + 1) if channels % g == 0)


def _grouped_bottleneck(in_ch: int, mid_ch: int, out_ch: int, stride: int) -> Bottleneck:
    return Bottleneck(in_ch, mid_ch, out_ch, stride, groups=group_count(mid_ch))


class CifarResNeXt(Backbone):
    """The official CIFAR ResNeXt; stages T1..T4 at reductions 1, 2, 4, 8.

    ``bottleneck=False``: wide-first BasicBlocks (ResNeXt-18/34); ``True``: grouped
    Bottlenecks (ResNeXt-50).
    """

    weight_init = staticmethod(_init_official_resnext)

    def __init__(self, bottleneck: bool, num_blocks: Sequence[int], num_classes: int, width_mult: float = 1.0):
        super().__init__()
        stem_ch = scale_channels(64, width_mult)
        self.conv1 = nn.Sequential(conv3x3(3, stem_ch))
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        block = _grouped_bottleneck if bottleneck else BasicBlock  # mid = 2 x planes: BasicBlock's first conv is wide
        out_ch = add_resnet_stages(self, stem_ch, num_blocks, block, width_mult, mid=2, expansion=4 if bottleneck else 1)
        self.fc = nn.Linear(out_ch, num_classes)
        _init_official_resnext(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


@register_backbone("resnext18")
def resnext18(num_classes: int, width_mult: float = 1.0) -> CifarResNeXt:
    return CifarResNeXt(False, (2, 2, 2, 2), num_classes, width_mult)


@register_backbone("resnext34")
def resnext34(num_classes: int, width_mult: float = 1.0) -> CifarResNeXt:
    return CifarResNeXt(False, (3, 4, 6, 3), num_classes, width_mult)


@register_backbone("resnext50")
def resnext50(num_classes: int, width_mult: float = 1.0) -> CifarResNeXt:
    return CifarResNeXt(True, (3, 4, 6, 3), num_classes, width_mult)
