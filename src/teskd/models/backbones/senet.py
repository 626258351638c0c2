"""CIFAR SE-ResNets (Squeeze-and-Excitation ResNets) as 4-stage backbones.

The architecture and the module names follow the official TESKD code
(``classification/models/senet_our.py``), so the backbone part of an official state
dict loads into these modules unchanged. Official layout::

    pre       Sequential(0: Conv2d 3x3, 3 -> 64, stride 1, pad 1, WITH bias,
                         1: BatchNorm2d, 2: ReLU)                    # no max-pool
    stage1 .. stage4   Sequential of blocks (strides 1, 2, 2, 2)     -> T1 .. T4
    global average pool -> linear (Linear(512 x expansion, classes))  # the teacher head

Every block (``stageN.{b}``) has

    residual    the residual path (see below); every conv in it HAS a bias
    shortcut    Sequential(0: Conv2d 1x1 with stride, WITH bias, 1: BatchNorm2d) when the
                shape changes (stride != 1 or channels differ); otherwise the identity
                (no parameters; the official code keeps an empty Sequential there, which
                has no state-dict keys either)
    squeeze     AdaptiveAvgPool2d(1) (no parameters)
    excitation  Sequential(0: Linear(C, C // 16), 1: ReLU, 2: Linear(C // 16, C), 3: Sigmoid)

with C the block's output channels. ``BasicResidualSEBlock`` (SE-ResNet-18/34,
expansion 1)::

    residual = Sequential(0: Conv 3x3 in -> out (stride), 1: BN, 2: ReLU,
                          3: Conv 3x3 out -> out,         4: BN, 5: ReLU)

``BottleneckResidualSEBlock`` (SE-ResNet-50, expansion 4; the stride sits on the 3x3)::

    residual = Sequential(0: Conv 1x1 in -> mid,          1: BN, 2: ReLU,
                          3: Conv 3x3 mid -> mid (stride), 4: BN, 5: ReLU,
                          6: Conv 1x1 mid -> 4 mid,        7: BN, 8: ReLU)

Forward of a block (as in the official code; note the residual path ends with a ReLU
*before* the SE scaling)::

    r = residual(x);  e = excitation(flatten(squeeze(r)))      # (B, C) in (0, 1)
    out = relu(r * e[:, :, None, None] + shortcut(x))

Example keys: ``pre.0.weight``, ``pre.0.bias``, ``pre.1.running_mean``,
``stage1.0.residual.0.weight``, ``stage1.0.residual.3.bias``,
``stage1.0.residual.4.running_var``, ``stage1.0.excitation.0.weight``,
``stage1.0.excitation.2.bias``, ``stage2.0.shortcut.0.weight``,
``stage2.0.shortcut.1.running_mean``, ``stage3.0.residual.6.weight`` (SE-ResNet-50),
``linear.weight``, ``linear.bias``.

``width_mult`` scales every channel count c to ``scale_channels(c, width_mult)``
(the stem, every conv, the SE input/output); the SE bottleneck is
``max(1, C // 16)`` of the scaled C (reduction 16 kept).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teskd.models.backbones._layers import add_resnet_stages, scale_channels
from teskd.models.backbones.base import Backbone
from teskd.models.registry import register_backbone

SE_REDUCTION = 16


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """The official SE-ResNet conv: padding k // 2 and a bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=True)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))


def _excitation(channels: int, reduction: int) -> nn.Sequential:
    hidden = max(1, channels // reduction)
    return nn.Sequential(
        nn.Linear(channels, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, channels),
        nn.Sigmoid(),
    )


class _SEBlock(nn.Module):
    """Shared forward: SE-scaled residual plus shortcut, then ReLU."""

    residual: nn.Sequential
    shortcut: nn.Module

    def _init_se(self, in_ch: int, out_ch: int, stride: int, reduction: int) -> None:
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = _excitation(out_ch, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        residual = self.residual(x)
        weights = self.excitation(torch.flatten(self.squeeze(residual), 1))
        return torch.relu(residual * weights[:, :, None, None] + shortcut)


class BasicResidualSEBlock(_SEBlock):
    """Two 3x3 convs (with biases), SE on the residual. ``mid_ch`` equals ``out_ch``."""

    expansion = 1

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, reduction: int = SE_REDUCTION):
        super().__init__()
        self.residual = nn.Sequential(
            _conv(in_ch, mid_ch, 3, stride),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            _conv(mid_ch, out_ch, 3),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self._init_se(in_ch, out_ch, stride, reduction)


class BottleneckResidualSEBlock(_SEBlock):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand (all with biases), SE on the residual."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, reduction: int = SE_REDUCTION):
        super().__init__()
        self.residual = nn.Sequential(
            _conv(in_ch, mid_ch, 1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            _conv(mid_ch, mid_ch, 3, stride),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            _conv(mid_ch, out_ch, 1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self._init_se(in_ch, out_ch, stride, reduction)


class CifarSEResNet(Backbone):
    """SE-ResNet with the CIFAR stem; stages T1..T4 at reductions 1, 2, 4, 8."""

    head_name = "linear"

    def __init__(
        self,
        block: type[BasicResidualSEBlock] | type[BottleneckResidualSEBlock],
        num_blocks: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
    ):
        super().__init__()
        stem_ch = scale_channels(64, width_mult)
        self.pre = nn.Sequential(_conv(3, stem_ch, 3), nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True))
        out_ch = add_resnet_stages(self, stem_ch, num_blocks, block, width_mult, expansion=block.expansion,
                                   names=("stage1", "stage2", "stage3", "stage4"))  # official names
        self.linear = nn.Linear(out_ch, num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre(x)


@register_backbone("seresnet18")
def seresnet18(num_classes: int, width_mult: float = 1.0) -> CifarSEResNet:
    return CifarSEResNet(BasicResidualSEBlock, (2, 2, 2, 2), num_classes, width_mult)


@register_backbone("seresnet34")
def seresnet34(num_classes: int, width_mult: float = 1.0) -> CifarSEResNet:
    return CifarSEResNet(BasicResidualSEBlock, (3, 4, 6, 3), num_classes, width_mult)


@register_backbone("seresnet50")
def seresnet50(num_classes: int, width_mult: float = 1.0) -> CifarSEResNet:
    return CifarSEResNet(BottleneckResidualSEBlock, (3, 4, 6, 3), num_classes, width_mult)
