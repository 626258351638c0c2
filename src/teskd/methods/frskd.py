"""FRSKD (Feature Refinement via Self-Knowledge Distillation, Ji et al., CVPR 2021).

Official code: MingiJi/FRSKD (``classification/models/bifpnc.py: BiFPNc``, ``models/utils.py:
DepthConvBlock``, ``distill_loss/AT.py``, ``distill_loss/KD.py``, ``utils.py: train``; the CIFAR
command: ``--alpha 2 --beta 100``, defaults ``--bifpn BiFPNc --width 2 --depth 2 --repeat 1
--temperature 4``, all four stages).

The classifier is the backbone ("classifier" branch, deployed). The self-teacher ("self_teacher") reads
its post-ReLU stage features f_1..f_4 (channels C_1..C_4) and is one BiFPNc layer: level k has
width W_k = width x C_k (BiFPNc keeps each level's own channel count, times ``width``; it is not one
common width), with

    pw(a -> b)   = 1x1 conv (no bias), BN, ReLU
    dw(c)        = [3x3 depthwise conv, 1x1 conv (no bias), BN] then (depth - 1) x [ReLU, 3x3 dw, 1x1, BN]
    fuse(w, xs)  = sum_i w_i x_i, w = relu(w_raw) / (sum relu(w_raw) + 1e-6), w_raw initialised to 1

    L_k = pw(C_k -> W_k)(f_k)       k = 1..4   lateral
    M_k = pw(C_k -> W_k)(f_k)       k = 2..4   second lateral (separate weights)
    top-down:   P_4 = L_4;  P_k = dw(W_k)(fuse(relu L_k, pw(W_{k+1} -> W_k)(up2(relu P_{k+1}))))   k = 3, 2, 1
    bottom-up:  N_1 = P_1;  N_k = dw(W_k)(fuse(relu M_k, relu P_k, pw(W_{k-1} -> W_k)(maxpool3s2(relu N_{k-1}))))
                k = 2, 3;  N_4 = dw(W_4)(fuse(relu M_4, pw(W_3 -> W_4)(maxpool3s2(relu N_3))))
    g_k = relu(N_k);  z_st = fc(gap(g_4))        (up2: nearest x2; maxpool3s2: TF-"same" padding)

Loss (``utils.py: train``, ``AT.py``, ``KD.py``), with alpha = 2, beta = 100, T = 4::

    CE(z_cls) + CE(z_st)
      + alpha * T^2 * KL(sg softmax(z_st / T) || softmax(z_cls / T))    (summed over classes / B; no eps)
      + beta * sum_k mean_{b, hw} (at(f_k) - at(sg g_k))^2,   at(f) = l2normalize_hw(mean_c f^2)

The self-teacher's parameters learn only from CE(z_st) (its logits and features are detached in the
KD and attention terms). As in the official code, the classifier's stage features enter the
self-teacher undetached, so CE(z_st) also reaches the classifier's stages.
Parts: ``ce`` (both CE terms), ``kd``, ``feat``.

Deviations: the self-teacher keeps PyTorch's default initialisation, as in the official code (the
backbone family's ``weight_init`` is not applied to it). Resampling uses the next level's actual
size (nearest interpolation; a max-pool result of another size is adaptively max-pooled to it),
which equals the official x2 upsample / stride-2 same-padded max-pool whenever the stage sizes
halve, as on every backbone here at its usual input size. ``repeat`` > 1 (stacked BiFPN layers) is
not offered (the CIFAR recipe uses 1; the official stacking only builds for ``width`` = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.losses import soft_kl
from teskd.methods._auxiliary import pooled
from teskd.methods.base import Method, StepOutput, register_method


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """at(f): the per-sample L2-normalised spatial map of the channel mean of f^2, shape (B, H*W)."""
    return F.normalize(f.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """mean over batch and positions of (at(f) - at(sg g))^2 (the official ``at_loss``)."""
    return (attention_map(f) - attention_map(g.detach())).pow(2).mean()


def _pointwise(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _depthwise(channels: int, depth: int) -> nn.Sequential:
    units = []
    for i in range(depth):
        layers = [] if i == 0 else [nn.ReLU()]
        layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                   nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)]
        units.append(nn.Sequential(*layers))
    return nn.Sequential(*units)


def _upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="nearest")


def _maxpool_same(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """3x3 stride-2 max-pool with TensorFlow "same" zero padding (the official static-same-padding pool)."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / 2) - 1) * 2 - h + 3, 0)
    pad_w = max((math.ceil(w / 2) - 1) * 2 - w + 3, 0)
    x = F.max_pool2d(F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]), 3, 2)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.adaptive_max_pool2d(x, tuple(size))
    return x


class SelfTeacher(nn.Module):
    """FRSKD's BiFPNc self-teacher (one layer) over four stage features; returns ([g_1..g_4], logits)."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 2, depth: int = 2):
        super().__init__()
        levels = len(channels)
        wide = [c * width for c in channels]
        self.lateral = nn.ModuleList(_pointwise(c, w) for c, w in zip(channels, wide))
        self.lateral2 = nn.ModuleList(_pointwise(c, w) for c, w in zip(channels[1:], wide[1:]))
        # top-down, index k = level k (0-based) for k < levels - 1
        self.up_proj = nn.ModuleList(_pointwise(wide[k + 1], wide[k]) for k in range(levels - 1))
        self.up_conv = nn.ModuleList(_depthwise(wide[k], depth) for k in range(levels - 1))
        self.up_weight = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(levels - 1))
        # bottom-up, index k - 1 for level k >= 1
        self.down_proj = nn.ModuleList(_pointwise(wide[k - 1], wide[k]) for k in range(1, levels))
        self.down_conv = nn.ModuleList(_depthwise(wide[k], depth) for k in range(1, levels))
        self.down_weight = nn.ParameterList(nn.Parameter(torch.ones(3 if k < levels - 1 else 2))
                                            for k in range(1, levels))
        self.fc = nn.Linear(wide[-1], num_classes)
        self.eps = 1e-6

    def _weights(self, raw: torch.Tensor) -> torch.Tensor:
        w = F.relu(raw)
        return w / (w.sum() + self.eps)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        n = len(feats)
        feats = [F.relu(f) for f in feats]
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        lat2 = [conv(f) for conv, f in zip(self.lateral2, feats[1:])]
        top_down = [None] * n
        top_down[-1] = lat[-1]
        for k in range(n - 2, -1, -1):
            w = self._weights(self.up_weight[k])
            up = self.up_proj[k](_upsample_to(F.relu(top_down[k + 1]), lat[k].shape[-2:]))
            top_down[k] = self.up_conv[k](w[0] * F.relu(lat[k]) + w[1] * up)
        out = [top_down[0]]
        for k in range(1, n):
            w = self._weights(self.down_weight[k - 1])
            down = self.down_proj[k - 1](_maxpool_same(F.relu(out[-1]), lat2[k - 1].shape[-2:]))
            if k < n - 1:
                fused = w[0] * F.relu(lat2[k - 1]) + w[1] * F.relu(top_down[k]) + w[2] * down
            else:
                fused = w[0] * F.relu(lat2[k - 1]) + w[1] * down
            out.append(self.down_conv[k - 1](fused))
        out = [F.relu(o) for o in out]
        logits = self.fc(pooled(out[-1]))
        return out, logits


@dataclass
class FrskdParams(MethodParams):
    name: str = "frskd"
    alpha: float = 2.0  # KD weight (CIFAR recipe; the argument default is 1)
    beta: float = 100.0  # attention-transfer weight (CIFAR recipe; the argument default is 0)
    temperature: float = 4.0
    width: int = 2  # the self-teacher's level k has width x C_k channels
    depth: int = 2  # 3x3 depthwise units per fusion block

    def validate(self) -> None:
        self.require(positive=["temperature"], non_negative=["alpha", "beta"], at_least={"width": 1, "depth": 1})


@register_method
class FRSKD(Method):
    name = "frskd"
    params_class = FrskdParams
    deploy_branch = "classifier"  # the paper's name; the self-teacher teaches it

    def __init__(self, backbone, num_classes: int, params: FrskdParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        self.self_teacher = SelfTeacher([s.channels for s in backbone.stage_info], num_classes,
                                        width=params.width, depth=params.depth)

    def _branches(self, images: torch.Tensor):
        stages, logits, _ = self.backbone.forward_features(images)
        feats = [F.relu(s) for s in stages]  # post-ReLU (already so on every backbone here)
        st_feats, st_logits = self.self_teacher(feats)
        return logits, feats, st_logits, st_feats

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        logits, feats, st_logits, st_feats = self._branches(images)
        ce = F.cross_entropy(logits, labels) + F.cross_entropy(st_logits, labels)
        kd = soft_kl(logits, st_logits, p.temperature)
        feat = sum(attention_transfer(f, g) for f, g in zip(feats, st_feats))
        parts = {"ce": ce, "kd": p.alpha * kd, "feat": p.beta * feat}
        loss = parts["ce"] + parts["kd"] + parts["feat"]
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()},
                          logits={"classifier": logits, "self_teacher": st_logits})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, _, st_logits, _ = self._branches(images)
        return {"classifier": logits, "self_teacher": st_logits}
