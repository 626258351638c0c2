"""CIFAR ResNets (3x3 stride-1 stem, no max-pool) as 4-stage backbones.

Layout (module names as in torchvision and the official TESKD code, so state dicts
look familiar; blocks in ``_layers.py``)::

    conv1 (3x3, 3 -> 64, stride 1, no bias), bn1, ReLU       # no max-pool on CIFAR
    layer1 .. layer4  (strides 1, 2, 2, 2)  -> T1 .. T4
    global average pool -> fc                                # the teacher head

``width_mult`` scales every channel count c to ``max(1, int(round(c * width_mult)))``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teskd.models.backbones._layers import (BasicBlock, Bottleneck, add_resnet_stages, conv3x3, resnet_depths,
                                            scale_channels)
from teskd.models.backbones.base import Backbone
from teskd.models.registry import register_backbone


class CifarResNet(Backbone):
    """ResNet with the CIFAR stem; stages T1..T4 at reductions 1, 2, 4, 8.

    The stem is the one thing the ImageNet ResNets change (``stem_conv``, ``stem_reduction``).
    """

    stem_reduction = 1

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
    ):
        super().__init__()
        stem_ch = scale_channels(64, width_mult)
        self.conv1 = self.stem_conv(stem_ch)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        out_ch = add_resnet_stages(self, stem_ch, num_blocks, block, width_mult, expansion=block.expansion,
                                   stem_reduction=self.stem_reduction)
        self.fc = nn.Linear(out_ch, num_classes)

    @staticmethod
    def stem_conv(channels: int) -> nn.Module:
        return conv3x3(3, channels)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def register_resnets(cls: type, suffix: str = "") -> None:
    """Register ``resnet{18,34,50}{suffix}`` as ``cls(block, blocks, num_classes, width_mult)``."""
    for depth, (block, blocks) in resnet_depths().items():
        def factory(num_classes: int, width_mult: float = 1.0, block=block, blocks=blocks):
            return cls(block, blocks, num_classes, width_mult)

        register_backbone(f"resnet{depth}{suffix}")(factory)


register_resnets(CifarResNet)
