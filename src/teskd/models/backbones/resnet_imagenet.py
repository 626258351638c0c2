"""ImageNet ResNets (torchvision's layout) as 4-stage backbones.

Layout, with torchvision's module names, so the deployed teacher's state dict is exactly
that of ``torchvision.models.resnet18/34/50(num_classes=N)`` (keys, shapes, order) and
loads into it with ``strict=True``::

    conv1 (7x7, 3 -> 64, stride 2, pad 3, no bias), bn1, ReLU, maxpool (3x3, stride 2, pad 1)
    layer1 .. layer4  (strides 1, 2, 2, 2)  -> T1 .. T4 at reductions 4, 8, 16, 32
    global average pool -> fc

ResNet-18/34 use BasicBlock, ResNet-50 the Bottleneck with the stride on its 3x3 conv
(torchvision's "v1.5"); the projection shortcut is ``layerX.0.downsample.{0,1}``. At 224 px
the stage maps are 56, 28, 14 and 7 pixels, so TESKD's students branch at stage 4 with
kernels 8, 4, 2, as on CIFAR.

Initialisation as torchvision's (``zero_init_residual=False``): He (fan-out) normal convs,
BN weight 1 / bias 0, the Linear head left at PyTorch's default. It is applied to the
backbone only: ``weight_init`` stays None, so TESKD's students keep PyTorch's defaults
(the official ImageNet TESKD code could not be consulted offline; like its CIFAR ResNets,
the students are assumed to be left at the defaults).

``width_mult`` scales every channel count c to ``max(1, int(round(c * width_mult)))``, as in
the CIFAR ResNets; 1.0 is exactly torchvision's network.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teskd.models.backbones._layers import BasicBlock, Bottleneck
from teskd.models.backbones.resnet import CifarResNet, register_resnets

STEM_REDUCTION = 4  # stride-2 conv, then stride-2 max-pool


def init_torchvision_resnet(module: nn.Module) -> None:
    """torchvision's ResNet init: He (fan-out) normal convs, BN weight 1 / bias 0; Linear untouched."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ImageNetResNet(CifarResNet):
    """ResNet with the ImageNet stem; stages T1..T4 at reductions 4, 8, 16, 32."""

    stem_reduction = STEM_REDUCTION

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int,
        width_mult: float = 1.0,
    ):
        super().__init__(block, num_blocks, num_classes, width_mult)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # no parameters: state dict unchanged
        init_torchvision_resnet(self)

    @staticmethod
    def stem_conv(channels: int) -> nn.Module:
        return nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


register_resnets(ImageNetResNet, "_imagenet")
