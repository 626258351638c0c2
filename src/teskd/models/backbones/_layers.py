"""Layers shared by the residual families (CIFAR ResNet, SE-ResNet, ResNeXt; ImageNet ResNet) and
channel scaling.

Block module names are torchvision's and the official TESKD code's: ``conv1, bn1, conv2, bn2``
(+ ``conv3, bn3`` for Bottleneck, whose stride sits on the 3x3 ``conv2``); when the shape
changes the shortcut is ``downsample`` = Sequential(1x1 conv without bias, BN), otherwise
the identity (no module, no parameters; the official code keeps an empty Sequential there).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from teskd.models.backbones.base import Backbone, StageInfo

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def scale_channels(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False, groups=groups)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs, ``in -> mid`` (carries the stride) and ``mid -> out``."""

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
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride; ``groups`` > 1 for ResNeXt), 1x1 expand."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = conv1x1(in_ch, mid_ch)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = conv3x3(mid_ch, mid_ch, stride, groups)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = conv1x1(mid_ch, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def add_resnet_stages(backbone: Backbone, in_ch: int, num_blocks: Sequence[int],
                      make_block: Callable[[int, int, int, int], nn.Module], width_mult: float,
                      mid: int = 1, expansion: int = 1, names: Sequence[str] = RESNET_STAGES,
                      stem_reduction: int = 1) -> int:
    """Add the four residual stages (base planes 64..512, strides 1, 2, 2, 2) as ``names``;
    set ``stage_info`` and ``num_features``; return the output channels.

    ``stem_reduction`` is the stem's spatial stride (1 for the CIFAR stems, 4 for ImageNet's
    stride-2 conv + stride-2 max-pool), so the stage reductions are ``stem_reduction`` x 1, 2, 4, 8.

    Stage ``planes`` has blocks ``make_block(in_ch, mid_ch, out_ch, stride)`` with
    ``mid_ch = mid x planes`` and ``out_ch = expansion x planes``, both scaled by ``width_mult``.
    """
    if len(num_blocks) != 4:
        raise ValueError(f"a residual backbone has 4 stages, got num_blocks={list(num_blocks)}")
    reduction, infos = stem_reduction, []
    for name, planes, blocks, stride in zip(names, (64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
        mid_ch, out_ch = scale_channels(mid * planes, width_mult), scale_channels(expansion * planes, width_mult)
        layers = []
        for b in range(blocks):
            layers.append(make_block(in_ch, mid_ch, out_ch, stride if b == 0 else 1))
            in_ch = out_ch
        backbone.add_module(name, nn.Sequential(*layers))
        reduction *= stride
        infos.append(StageInfo(channels=out_ch, reduction=reduction, module=name))
    backbone.stage_info = tuple(infos)
    backbone.num_features = in_ch
    return in_ch


def resnet_depths() -> dict[int, tuple[type, tuple[int, int, int, int]]]:
    """ResNet depth -> (block, blocks per stage), shared by the CIFAR and ImageNet families."""
    return {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def init_conv_bn(module: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) normal convolutions with zero biases, BatchNorm weight 1 and bias 0, and, if ``linear_std``
    is given, N(0, linear_std) Linear weights with zero biases; one pass in module order (the RNG order)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
