"""CIFAR ResNets (3x3 stride-1 stem, no max-pool) as 4-stage backbones.

Layout (module names as in torchvision and the official TESKD code, so state dicts
look familiar)::

    conv1 (3x3, 3 -> 64, stride 1, no bias), bn1, ReLU       # no max-pool on CIFAR
    layer1 .. layer4  (strides 1, 2, 2, 2)  -> T1 .. T4
    global average pool -> fc                                # the teacher head

Blocks: ``conv1, bn1, conv2, bn2`` (+ ``conv3, bn3`` for Bottleneck, whose stride sits
on the 3x3 ``conv2``); when the shape changes the shortcut is ``downsample`` =
Sequential(1x1 conv without bias, BN), otherwise the identity (no module, no
parameters; the official code keeps an empty Sequential under the same name).

``width_mult`` scales every channel count c to ``max(1, int(round(c * width_mult)))``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from teskd.models.backbones.base import Backbone, StageInfo
from teskd.models.registry import register_backbone


def scale_channels(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def add_resnet_stages(backbone: Backbone, in_ch: int, num_blocks: Sequence[int],
                      make_block: Callable[[int, int, int, int], nn.Module],
                      widths: Callable[[int], tuple[int, int]]) -> int:
    """Add the four CIFAR residual stages (base planes 64..512, strides 1, 2, 2, 2) under
    ``backbone.stage_names``; set ``stage_info`` and ``num_features``; return the output channels.

    ``widths(planes) -> (mid_ch, out_ch)`` and ``make_block(in_ch, mid_ch, out_ch, stride)``
    are what differ between the ResNet families.
    """
    if len(num_blocks) != 4:
        raise ValueError(f"a residual backbone has 4 stages, got num_blocks={list(num_blocks)}")
    reduction, infos = 1, []
    for name, planes, blocks, stride in zip(backbone.stage_names, (64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
        mid_ch, out_ch = widths(planes)
        layers = []
        for b in range(blocks):
            layers.append(make_block(in_ch, mid_ch, out_ch, stride if b == 0 else 1))
            in_ch = out_ch
        backbone.add_module(name, nn.Sequential(*layers))
        reduction *= stride
        infos.append(StageInfo(channels=out_ch, reduction=reduction))
    backbone.stage_info = tuple(infos)
    backbone.num_features = in_ch
    return in_ch


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs. ``mid_ch`` equals ``out_ch`` (expansion 1)."""

    expansion = 1

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, mid_ch, stride)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = conv3x3(mid_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand (expansion 4)."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv1x1(in_ch, mid_ch)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = conv3x3(mid_ch, mid_ch, stride)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = conv1x1(mid_ch, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(Backbone):
    """ResNet with the CIFAR stem; stages T1..T4 at reductions 1, 2, 4, 8."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
    ):
        super().__init__()
        stem_ch = scale_channels(64, width_mult)
        self.conv1 = conv3x3(3, stem_ch)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)

        widths = lambda planes: (scale_channels(planes, width_mult),  # noqa: E731
                                 scale_channels(planes * block.expansion, width_mult))
        self.fc = nn.Linear(add_resnet_stages(self, stem_ch, num_blocks, block, widths), num_classes)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


@register_backbone("resnet18")
def resnet18(num_classes: int, width_mult: float = 1.0) -> CifarResNet:
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes, width_mult)


@register_backbone("resnet34")
def resnet34(num_classes: int, width_mult: float = 1.0) -> CifarResNet:
    return CifarResNet(BasicBlock, (3, 4, 6, 3), num_classes, width_mult)


@register_backbone("resnet50")
def resnet50(num_classes: int, width_mult: float = 1.0) -> CifarResNet:
    return CifarResNet(Bottleneck, (3, 4, 6, 3), num_classes, width_mult)
