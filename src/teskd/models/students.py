"""TESKD's hierarchical students, built from the backbone's stage shapes only.

Given the four stage outputs T1..T4 (shallow to deep) of any 4-stage backbone, a
top-down "mixed fusion" path produces one map per level and a student head reads
each requested level (spec section 2, official ``CIFAR_ResNet`` in
``classification/models/resnet_our.py``)::

    S4 = lateral_3(T4)
    for L = 3, 2, 1 (down to the shallowest requested level):
        U_L = upsample_{L-1}(S_{L+1})         # bilinear x r (align_corners) -> 1x1 conv, BN, ReLU
        S_L = fuse_L(cat[U_L + lateral_{L-1}(T_L), U_L])
    student L:  f_L = flatten(avgpool(downsample_L(S_L)));  logits_L = fc_bL(f_L)

Every module has the single width C (``width``; the faithful choice is the last
stage's channel count, 512 x expansion). ``r`` is reduction(T_{L+1}) / reduction(T_L)
(2 for ResNets and VGG) and the auxiliary branch ``downsample_L`` is a k x k, stride-k
conv with k = reduction(T_B) / reduction(T_L), B = ``branch_stage`` (the backbone's
``Backbone.branch_stage``), so each level reaches the T_B size before pooling:
B = 4 and k = 8, 4, 2 for CIFAR ResNets, B = 3 and k = 4, 2, 1 for CIFAR VGG.

Per-level widths (an ablation, not in the paper): ``width`` may instead be a mapping
{1: C1, 2: C2, 3: C3} (all three levels, even unrequested ones, because the top-down
path's width at S4 is C3). Level L's modules then have width C_L, with C4 := C3::

    S4 = lateral_3(T4)                      width C3
    upsample_j: S(j+2) (C_{j+2}) -> C_{j+1}  (the 1x1 conv changes the width)
    lateral_j:  T(j+1) -> C_{j+1}
    fuse_L: 2 C_L -> C_L;  downsample_L: C_L -> C_L;  fc_bL: Linear(C_L, classes)

so student L's feature has C_L entries. An int width gives exactly the modules above.

Module names are the official ones, so an official checkpoint's student weights
load by name (``laterals`` and ``upsample`` are ModuleDicts keyed "0".."3" /
"0".."2", which gives exactly the state-dict keys of the official ModuleLists)::

    laterals.{i}    i = 0..3   Sequential(0: Conv1x1 c_i->C no bias, 1: BN, 2: ReLU)   on T(i+1)
    upsample.{j}    j = 0..2   Sequential(0: Upsample, 1: Conv1x1 C->C no bias, 2: BN, 3: ReLU)
                               upsample.{j} maps S(j+2) to the resolution of T(j+1)
    fuse_{L}        L = 1..3   Sequential(0: Conv1x1 2C->C no bias, 1: BN, 2: ReLU)
    downsample{L}   L = 1..3   Sequential(0: Conv kxk/stride k C->C with bias, 1: BN, 2: ReLU,
                                          3: Conv1x1 C->C with bias, 4: BN, 5: ReLU)
    fc_b{L}         L = 1..3   Linear(C, num_classes)

Index/level 1 is the shallowest student (reads T1..T4), 3 the deepest (reads T3, T4).
Output keys: "student1", "student2", "student3" (the official code returns them
deepest first and its logs swap their names; here the name is the level).

With ``levels`` a subset of {1, 2, 3}, the top-down path runs only down to the
shallowest requested level: the laterals, upsamples and fuses below it are not
built, and neither are the branches/heads of unrequested levels (fuses of deeper,
unrequested levels are built, since the path goes through them).

This is the plain reference implementation; faster exact rewrites must match it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from teskd.errors import TeskdError
from teskd.models.backbones.base import StageInfo

LEVELS = (1, 2, 3)


def _conv_bn_relu(in_ch: int, out_ch: int, inplace: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=inplace),
    )


def _upsample_block(in_ch: int, out_ch: int, scale: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True),
        nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


def _auxiliary_branch(width: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, width, kernel_size=kernel, stride=kernel, bias=True),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, kernel_size=1, bias=True),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


def _ratio(deep: StageInfo, shallow: StageInfo, what: str) -> int:
    """reduction(deep) / reduction(shallow); a TeskdError unless it is an integer >= 1."""
    if shallow.reduction <= 0 or deep.reduction < shallow.reduction or deep.reduction % shallow.reduction != 0:
        raise TeskdError(
            f"students need integer stage-reduction ratios >= 1 for the {what}, "
            f"got reductions {shallow.reduction} and {deep.reduction}"
        )
    return deep.reduction // shallow.reduction


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _level_widths(width: int | Mapping[int, int]) -> dict[int, int]:
    """``{1: C1, 2: C2, 3: C3}`` from a single width or a per-level mapping (all three levels)."""
    if isinstance(width, Mapping):
        if set(width) != set(LEVELS) or not all(_is_positive_int(w) for w in width.values()):
            raise TeskdError(
                f"per-level student widths must map each of the levels 1, 2, 3 to a positive integer, "
                f"got {dict(width)!r}"
            )
        return {level: width[level] for level in LEVELS}
    if not _is_positive_int(width):
        raise TeskdError(f"student width must be a positive integer or a {{level: width}} mapping, got {width!r}")
    return {level: width for level in LEVELS}


class HierarchicalStudents(nn.Module):
    """The students' top-down fusion, auxiliary branches and heads (see module docstring)."""

    def __init__(
        self,
        stage_info: Sequence[StageInfo],
        num_classes: int,
        width: int | Mapping[int, int],
        levels: Sequence[int] = LEVELS,
        branch_stage: int = 4,
    ):
        super().__init__()
        stage_info = tuple(stage_info)
        if len(stage_info) != 4:
            raise TeskdError(f"students need a 4-stage backbone, got {len(stage_info)} stages")
        levels = tuple(sorted(levels))
        if not levels or len(set(levels)) != len(levels) or not set(levels) <= set(LEVELS):
            raise TeskdError(f"student levels must be a non-empty subset of {{1, 2, 3}}, got {list(levels)}")
        widths = _level_widths(width)
        if not _is_positive_int(num_classes):
            raise TeskdError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not _is_positive_int(branch_stage) or branch_stage > 4:
            raise TeskdError(f"branch_stage must be a stage number 1..4, got {branch_stage!r}")

        self.stage_info = stage_info
        self.levels = levels
        self.widths = widths  # level -> width, levels 1..3
        # the single width C, or None when the levels' widths differ
        self.width = widths[1] if len(set(widths.values())) == 1 else None
        self.branch_stage = branch_stage
        self.num_classes = num_classes
        self.fast = True  # use the exact rewrites of students_fast.py in forward()
        lowest = levels[0]  # the shallowest requested level; the path stops there

        def level_width(level: int) -> int:  # C_L, with C4 := C3 (the width of S4)
            return widths[min(level, 3)]

        # lateral i reads T(i+1) and has the width of S(i+1); needed for the levels lowest..3 and for T4
        self.laterals = nn.ModuleDict(
            {str(i): _conv_bn_relu(stage_info[i].channels, level_width(i + 1)) for i in range(lowest - 1, 4)}
        )
        # upsample j brings S(j+2) to the size and width of S(j+1); fuse_L builds S_L for L = j+1
        self.upsample = nn.ModuleDict(
            {
                str(j): _upsample_block(
                    level_width(j + 2),
                    level_width(j + 1),
                    _ratio(stage_info[j + 1], stage_info[j], "top-down upsampling"),
                )
                for j in range(lowest - 1, 3)
            }
        )
        for level in range(lowest, 4):
            self.add_module(f"fuse_{level}", _conv_bn_relu(2 * widths[level], widths[level]))
        for level in levels:
            what = f"auxiliary branch of level {level} (branch_stage {branch_stage})"
            kernel = _ratio(stage_info[branch_stage - 1], stage_info[level - 1], what)
            self.add_module(f"downsample{level}", _auxiliary_branch(widths[level], kernel))
            self.add_module(f"fc_b{level}", nn.Linear(widths[level], num_classes))

    @property
    def names(self) -> tuple[str, ...]:
        """Output keys, shallowest first."""
        return tuple(f"student{level}" for level in self.levels)

    def fuse(self, level: int) -> nn.Module:
        return self.get_submodule(f"fuse_{level}")

    def branch(self, level: int) -> nn.Module:
        return self.get_submodule(f"downsample{level}")

    def head(self, level: int) -> nn.Module:
        return self.get_submodule(f"fc_b{level}")

    def top_down(self, stages: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The fused maps S_L for L = 3 down to the shallowest requested level."""
        if len(stages) != 4:
            raise TeskdError(f"students expect the 4 stage outputs T1..T4, got {len(stages)} tensors")
        fused: dict[int, torch.Tensor] = {}
        above = self.laterals["3"](stages[3])  # S4
        for level in range(3, self.levels[0] - 1, -1):
            up = self.upsample[str(level - 1)](above)
            lateral = self.laterals[str(level - 1)](stages[level - 1])
            above = self.fuse(level)(torch.cat([up + lateral, up], dim=1))
            fused[level] = above
        return fused

    def forward(self, stages: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"student<L>": (logits, feature)}`` for each requested level, shallowest first.

        ``feature`` is the pooled output of the level's auxiliary branch, shape (B, C_L).
        With ``self.fast`` (the default) an exactly equivalent, faster formulation runs
        (``students_fast.py``); ``forward_reference`` is the plain one.
        """
        if self.fast:
            from teskd.models.students_fast import fast_forward

            if len(stages) != 4:
                raise TeskdError(f"students expect the 4 stage outputs T1..T4, got {len(stages)} tensors")
            return fast_forward(self, stages)
        return self.forward_reference(stages)

    def forward_reference(self, stages: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The plain formulation, module by module as in the official code."""
        fused = self.top_down(stages)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for level in self.levels:
            feature = torch.flatten(nn.functional.adaptive_avg_pool2d(self.branch(level)(fused[level]), 1), 1)
            out[f"student{level}"] = (self.head(level)(feature), feature)
        return out
