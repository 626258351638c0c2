"""BYOT, "Be Your Own Teacher" (Zhang et al., ICCV 2019): exits after stages 1-3 learn from the final head.

Reference: the code named in the spec (section 7), luanyunteng/pytorch-be-your-own-teacher
(``models/resnet.py``, ``train.py``); its loss, with the final logits z, exit logits z_i, pooled
features f (final) and f_i (exits)::

    (1 - alpha) * [CE(z) + sum_i CE(z_i)]
  + alpha * sum_i T^2 * mean_batch( -sum_c sg(softmax(z/T))_c * log_softmax(z_i/T)_c )   (soft cross-entropy)
  + beta  * sum_i sum (f_i - sg f)^2 [f_i > 0 or f > 0]                                   (a sum, not a mean)

with alpha = 0.1, beta = 1e-6, T = 3 (its argument defaults). The soft cross-entropy equals
KL(sg p || p_i) plus the entropy of the detached target: the same gradients, a larger logged value.

Exits (``exit_type``), sized from ``backbone.stage_info`` only (C = the last stage's channels,
k_i = reduction(stage 4) / reduction(stage i), so every exit reaches the last stage's resolution):

* ``bottleneck`` (default; the reference code's ``branchBottleNeck``): 1x1 conv c_i -> C/4, BN, ReLU,
  k_i x k_i stride-k_i conv C/4 -> C/4, BN, ReLU, 1x1 conv C/4 -> C, BN, ReLU (convs with bias),
  global average pool -> f_i (C values) -> Linear(C, classes). (The reference also builds
  ``downsample{i}_1`` modules that its forward never uses; they are left out.)
* ``sepconv``: the paper authors' code (ArchipLab-LinfengZhang/pytorch-self-distillation-final):
  an attention mask sigmoid(upsample(SepConv(x))) multiplies stage i's map, then a chain of SepConvs
  c_i -> c_{i+1} -> ... -> C (each with the stride between consecutive stages) and a global average
  pool. That code trains with another loss (no feature term, weight 0.3); here only its exits are
  offered, under the loss above.

The authors' code trains with AutoAugment and Cutout by default (the spec attributes them to the
luanyunteng code, whose loader has only crop + flip); augmentation is not part of the method and is
not applied here. Exits are initialised like the reference
codes' (He fan-out convs, BN 1/0). The final head is the backbone's own: ``deploy_module`` is the
plain backbone, and its branch is ``teacher``, since it teaches the exits (the soft targets above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.losses import masked_feature_l2
from teskd.methods._auxiliary import check_stage_size, exit_name, pooled, stage_ratio
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models.backbones._layers import init_conv_bn
from teskd.models.backbones.base import StageInfo

EXIT_TYPES = ("bottleneck", "sepconv")
EXIT_STAGES = (1, 2, 3)


@dataclass
class ByotParams(MethodParams):
    name: str = "byot"
    alpha: float = 0.1  # weight of the distillation term; the CE terms get 1 - alpha
    beta: float = 1e-6  # weight of the (summed) feature term
    temperature: float = 3.0
    exit_type: str = "bottleneck"  # bottleneck (reference code) | sepconv (the authors' scala + attention)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise TeskdError(f"method.alpha must be in [0, 1], got {self.alpha}")
        self.require(positive=["temperature"], non_negative=["beta"])
        if self.exit_type not in EXIT_TYPES:
            raise TeskdError(f"method.exit_type must be one of {', '.join(EXIT_TYPES)}, got {self.exit_type!r}")


def byot_loss(final_logits: torch.Tensor, exit_logits: Sequence[torch.Tensor], final_feature: torch.Tensor,
              exit_features: Sequence[torch.Tensor], labels: torch.Tensor, alpha: float, beta: float,
              temperature: float) -> dict[str, torch.Tensor]:
    """The weighted parts ``{"ce", "kd", "feat"}`` of the BYOT loss (module docstring); they sum to the loss."""
    t = temperature
    ce = F.cross_entropy(final_logits.float(), labels)
    target = F.softmax(final_logits.detach().float() / t, dim=1)
    kd = final_logits.new_zeros((), dtype=torch.float32)
    feat = final_logits.new_zeros((), dtype=torch.float32)
    for logits, feature in zip(exit_logits, exit_features, strict=True):
        ce = ce + F.cross_entropy(logits.float(), labels)
        kd = kd + (-(target * F.log_softmax(logits.float() / t, dim=1)).sum(dim=1).mean()) * (t * t)
        feat = feat + masked_feature_l2(feature, final_feature)  # detaches the final feature
    return {"ce": (1.0 - alpha) * ce, "kd": alpha * kd, "feat": beta * feat}


class BottleneckExit(nn.Sequential):
    """The reference ``branchBottleNeck``: 1x1 -> C/4, k x k stride k, 1x1 -> C (each + BN + ReLU, convs with bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        mid = max(1, out_ch // 4)
        super().__init__(
            nn.Conv2d(in_ch, mid, kernel_size=1), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=kernel, stride=kernel), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, out_ch, kernel_size=1), nn.BatchNorm2d(out_ch), nn.ReLU())


class SepConv(nn.Sequential):
    """Two depthwise-separable 3x3 convs (the first carries the stride), each followed by BN and ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, in_ch, 1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(),
            nn.Conv2d(in_ch, in_ch, 3, stride=1, padding=1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class SepConvExit(nn.Module):
    """The authors' exit: ``x * sigmoid(upsample(SepConv_s2(x)))``, then SepConvs down to the last stage."""

    def __init__(self, stage_info: Sequence[StageInfo], stage: int):
        super().__init__()
        channels = stage_info[stage - 1].channels
        self.attention = SepConv(channels, channels, stride=2)
        self.scala = nn.Sequential(*(
            SepConv(stage_info[j - 1].channels, stage_info[j].channels, stage_ratio(stage_info[j], stage_info[j - 1]))
            for j in range(stage, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.scala(torch.sigmoid(mask) * x)


@register_method
class BYOT(Method):
    name = "byot"
    params_class = ByotParams
    deploy_branch = "teacher"  # the final head: the exits learn from it

    def __init__(self, backbone, num_classes: int, params: ByotParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        info = backbone.stage_info
        width = info[-1].channels
        if width != backbone.num_features:
            raise TeskdError(f"BYOT compares exit features with the {backbone.num_features}-d pooled feature, but the "
                             f"last stage has {width} channels")
        self.exits = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for stage in EXIT_STAGES:
            if params.exit_type == "bottleneck":
                kernel = stage_ratio(info[-1], info[stage - 1])
                check_stage_size(info, stage, input_size, kernel, f"BYOT's {exit_name(stage)}")
                self.exits[exit_name(stage)] = BottleneckExit(info[stage - 1].channels, width, kernel)
            else:
                self.exits[exit_name(stage)] = SepConvExit(info, stage)
            self.heads[exit_name(stage)] = nn.Linear(width, num_classes)
        init_conv_bn(self.exits)  # the reference code's init; Linear layers keep PyTorch's

    def _branches(self, images: torch.Tensor):
        stages, logits, feature = self.backbone.forward_features(images)
        exits = {}
        for stage in EXIT_STAGES:
            name = exit_name(stage)
            f = pooled(self.exits[name](stages[stage - 1]))
            exits[name] = (self.heads[name](f), f)
        return logits, feature, exits

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        logits, feature, exits = self._branches(images)
        parts = byot_loss(logits, [z for z, _ in exits.values()], feature, [f for _, f in exits.values()], labels,
                          p.alpha, p.beta, p.temperature)
        loss = parts["ce"] + parts["kd"] + parts["feat"]
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()},
                          logits={"teacher": logits, **{name: z for name, (z, _) in exits.items()}})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _, exits = self._branches(images)
        return {"teacher": logits, **{name: z for name, (z, _) in exits.items()}}
