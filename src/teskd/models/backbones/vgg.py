"""CIFAR VGG-16/19 (with BN and conv biases) as 4-stage backbones.

Layout (module names and Sequential indices as in the official TESKD
``classification/models/vgg_our.py``, so an official state dict's backbone keys
load unchanged)::

    conv1 (3x3, 3 -> 64, bias), bn1, ReLU, conv2 (3x3, 64 -> 64, bias), bn2, ReLU, maxpool 2
    layer1  2 x [conv3x3 (bias), BN, ReLU] -> 128, maxpool 2       -> T1 (128 @ 8x8)
    layer2  n x [conv3x3 (bias), BN, ReLU] -> 256, maxpool 2       -> T2 (256 @ 4x4)
    layer3  n x [conv3x3 (bias), BN, ReLU] -> 512, maxpool 2       -> T3 (512 @ 2x2)
    layer4  n x [conv3x3 (bias), BN, ReLU] -> 512, maxpool 2       -> T4 (512 @ 1x1)
    global average pool -> classifier = Sequential(0: Linear(512, 512), 1: ReLU,
                                                   2: Linear(512, 512), 3: ReLU,
                                                   4: Linear(512, num_classes))

with n = 3 (VGG-16) or 4 (VGG-19). Inside ``layerK`` the indices are 3i (conv), 3i + 1
(BN), 3i + 2 (ReLU) for the i-th conv, then the max-pool. Stage reductions are 4, 8,
16, 32 (sizes 8, 4, 2, 1 for a 32x32 input).

Initialisation as in the official code: convs Kaiming-normal (fan_out, ReLU) with zero
bias, BN weight 1 / bias 0, Linear weight N(0, 0.01) with zero bias.

``width_mult`` scales every channel count c, including the classifier's hidden 512, to
``max(1, int(round(c * width_mult)))``.
"""

from __future__ import annotations

import torch
from torch import nn

from teskd.models.backbones._layers import init_conv_bn, scale_channels
from teskd.models.backbones.base import Backbone, StageInfo
from teskd.models.registry import register_backbone

STAGE_CHANNELS = (128, 256, 512, 512)


def _vgg_stage(in_ch: int, out_ch: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x [3x3 conv with bias, BN, ReLU], then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        in_ch = out_ch
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def init_official_vgg(module: nn.Module) -> None:
    """The official VGG initialisation, applied to every conv, BN and Linear in ``module``."""
    init_conv_bn(module, linear_std=0.01)


class CifarVGG(Backbone):
    """VGG with BN for 32x32 inputs; stages T1..T4 at reductions 4, 8, 16, 32."""

    head_name = "classifier"
    weight_init = staticmethod(init_official_vgg)

    def __init__(self, depth: int, num_classes: int, width_mult: float = 1.0):
        super().__init__()
        if depth not in (16, 19):
            raise ValueError(f"VGG depth must be 16 or 19, got {depth}")
        convs_per_stage = (2, 3, 3, 3) if depth == 16 else (2, 4, 4, 4)
        stem_ch = scale_channels(64, width_mult)
        self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.conv2 = nn.Conv2d(stem_ch, stem_ch, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)

        in_ch, reduction, infos = stem_ch, 2, []
        for index, (channels, num_convs) in enumerate(zip(STAGE_CHANNELS, convs_per_stage)):
            out_ch = scale_channels(channels, width_mult)
            name = f"layer{index + 1}"
            self.add_module(name, _vgg_stage(in_ch, out_ch, num_convs))
            in_ch, reduction = out_ch, reduction * 2
            infos.append(StageInfo(channels=out_ch, reduction=reduction, module=name))

        self.stage_info = tuple(infos)
        self.num_features = in_ch
        hidden = scale_channels(512, width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        init_official_vgg(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(self.relu(self.bn2(self.conv2(x))))


@register_backbone("vgg16")
def vgg16(num_classes: int, width_mult: float = 1.0) -> CifarVGG:
    return CifarVGG(16, num_classes, width_mult)


@register_backbone("vgg19")
def vgg19(num_classes: int, width_mult: float = 1.0) -> CifarVGG:
    return CifarVGG(19, num_classes, width_mult)
