"""DKS, Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019): auxiliary classifiers on intermediate
stages and dense pairwise knowledge matching among all classifiers.

Loss (reference code sundw2014/DKS, ``wrn_DKS/main.py`` and ``KL_divergence.py``), over the branches
b = exits + the backbone's head (``deployed``), weights 1, T = 1::

    sum_i [ CE(z_i) + sum_{j != i} KL(sg p_j || p_i) ],   p = (softmax(z) + eps) / (1 + C eps),  eps = 1e-8

with KL(p || q) = mean over the batch of sum_c p_c log(p_c / q_c); both distributions are smoothed.

Auxiliary branches. The reference code (a 3-group WRN) forks one branch after every group but the last;
each branch is a fresh copy of the *remaining* groups, built from the backbone's own residual blocks
(after group 1: n blocks of group 2 + n/2 of group 3; after group 2: n blocks of group 3 at twice the
width), then BN-ReLU, global average pool and a Linear head. Here, for any 4-stage backbone, the branch
after stage i is likewise a copy of stages i+1..4 sized from ``stage_info`` (stage j's channels, the
stride reduction(j)/reduction(j-1)), built from the project's post-activation residual blocks:

* ``replica_blocks`` = blocks in the copies of stages 2, 3, 4 (default 1, 1, 2: for ResNet-18 the block
  counts of the public Self-KD-Lib's CIFAR_ResNet18_dks, the same-recipe source of the baseline number in
  the spec: layer3 1 block + layer4 2 blocks after stage 2, layer4 2 blocks after stage 3; that library
  uses pre-activation blocks, here post-activation ones like the backbones');
* ``replica_block``: ``basic`` (two 3x3 convs), ``bottleneck`` (1x1 -> out/4, 3x3, 1x1 -> out) or
  ``auto`` (bottleneck when the last stage has more than 512 channels, i.e. the 2048-channel
  ResNet-50 families, where basic blocks would add ~150M parameters; basic otherwise).
  The backbone's own block type is not copied (VGG has none, and only ``stage_info`` is read);
* ``exit_stages`` (default 2, 3: after the 2nd and 3rd of four stages, as Self-KD-Lib's ResNets and the
  paper's ImageNet ResNets; the WRN code's "every stage but the last" is ``[1, 2, 3]``).

The exits are named by the stage they read (``exit2``, ``exit3``); the backbone's head is ``deployed``
(every classifier teaches every other alike, so none is *the* teacher) and ``deploy_module`` is the plain
backbone. Branch convs get the He fan-out init, BN 1/0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.methods._auxiliary import exit_name, pooled, stage_ratio
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models.backbones._layers import BasicBlock, Bottleneck, init_conv_bn
from teskd.models.backbones.base import StageInfo

REPLICA_BLOCKS = ("auto", "basic", "bottleneck")
AUTO_BOTTLENECK_ABOVE = 512  # last-stage channels above which ``auto`` picks bottleneck blocks


@dataclass
class DksParams(MethodParams):
    name: str = "dks"
    exit_stages: list[int] = field(default_factory=lambda: [2, 3])  # stages (1..3) that get an auxiliary branch
    replica_blocks: list[int] = field(default_factory=lambda: [1, 1, 2])  # blocks in the copies of stages 2, 3, 4
    replica_block: str = "auto"  # auto | basic | bottleneck
    eps: float = 1e-8  # probability smoothing of the synergy KL

    def validate(self) -> None:
        if not self.exit_stages or len(set(self.exit_stages)) != len(self.exit_stages) or any(
                s not in (1, 2, 3) for s in self.exit_stages):
            raise TeskdError(f"method.exit_stages must be distinct stages among 1, 2, 3, got {self.exit_stages}")
        if len(self.replica_blocks) != 3 or any(n < 1 for n in self.replica_blocks):
            raise TeskdError(f"method.replica_blocks must be 3 block counts >= 1 (stages 2, 3, 4), "
                             f"got {self.replica_blocks}")
        if self.replica_block not in REPLICA_BLOCKS:
            raise TeskdError(f"method.replica_block must be one of {', '.join(REPLICA_BLOCKS)}, "
                             f"got {self.replica_block!r}")
        if not 0.0 <= self.eps < 1.0:
            raise TeskdError(f"method.eps must be in [0, 1), got {self.eps}")


def smoothed_softmax(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """``(softmax(z) + eps) / (1 + C eps)`` (the reference's smoothing; still sums to 1)."""
    return (F.softmax(logits.float(), dim=1) + eps) / (1.0 + logits.shape[1] * eps)


def dks_loss(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """The parts ``{"ce", "kd"}`` of the DKS loss over all branches in ``logits`` (weights 1; they sum to the loss)."""
    probs = {name: smoothed_softmax(z, eps) for name, z in logits.items()}
    first = next(iter(logits.values()))
    ce = first.new_zeros((), dtype=torch.float32)
    kd = first.new_zeros((), dtype=torch.float32)
    for i, z in logits.items():
        ce = ce + F.cross_entropy(z.float(), labels)
        log_q = probs[i].log()
        for j in logits:
            if j != i:
                p = probs[j].detach()
                kd = kd + (p * (p.log() - log_q)).sum(dim=1).mean()
    return {"ce": ce, "kd": kd}


def replica_branch(stage_info: Sequence[StageInfo], stage: int, blocks: Sequence[int],
                   bottleneck: bool) -> nn.Sequential:
    """Fresh copies of stages ``stage+1``..4 (``blocks[j-2]`` residual blocks for stage j)."""
    layers: list[nn.Module] = []
    in_ch = stage_info[stage - 1].channels
    for j in range(stage + 1, 5):
        out_ch = stage_info[j - 1].channels
        stride = stage_ratio(stage_info[j - 1], stage_info[j - 2])
        for b in range(blocks[j - 2]):
            s = stride if b == 0 else 1
            if bottleneck:
                layers.append(Bottleneck(in_ch, max(1, out_ch // 4), out_ch, s))
            else:
                layers.append(BasicBlock(in_ch, out_ch, out_ch, s))
            in_ch = out_ch
    return nn.Sequential(*layers)


@register_method
class DKS(Method):
    name = "dks"
    params_class = DksParams

    def __init__(self, backbone, num_classes: int, params: DksParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        info = backbone.stage_info
        bottleneck = params.replica_block == "bottleneck" or (
            params.replica_block == "auto" and info[-1].channels > AUTO_BOTTLENECK_ABOVE)
        self.exit_stages = tuple(sorted(params.exit_stages))
        self.exits = nn.ModuleDict({exit_name(s): replica_branch(info, s, params.replica_blocks, bottleneck)
                                    for s in self.exit_stages})
        self.heads = nn.ModuleDict({exit_name(s): nn.Linear(info[-1].channels, num_classes)
                                    for s in self.exit_stages})
        init_conv_bn(self.exits)  # the reference code's init; Linear layers keep PyTorch's

    def _branches(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        stages, logits, _ = self.backbone.forward_features(images)
        out = {"deployed": logits}
        for s in self.exit_stages:
            out[exit_name(s)] = self.heads[exit_name(s)](pooled(self.exits[exit_name(s)](stages[s - 1])))
        return out

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        logits = self._branches(images)
        parts = dks_loss(logits, labels, self.params.eps)
        return StepOutput(loss=parts["ce"] + parts["kd"], parts={k: v.detach() for k, v in parts.items()},
                          logits=logits)

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._branches(images)
