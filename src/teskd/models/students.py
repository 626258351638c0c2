"""TESKD's hierarchical students, built from the backbone's stage shapes only.

Given the four stage outputs T1..T4 (shallow to deep) of any 4-stage backbone, a
top-down "mixed fusion" path produces one map per level and a student head reads
each requested level (spec section 2, official ``CIFAR_ResNet`` in
``classification/models/resnet_our.py``)::

    S4 = lateral_3(T4)
    for L = 3, 2, 1 (down to the shallowest requested level):
        U_L = upsample_{L-1}(S_{L+1})         # bilinear to T_L's size (align_corners) -> 1x1 conv, BN, ReLU
        S_L = fuse_L(cat[U_L + lateral_{L-1}(T_L), U_L])
    student L:  f_L = flatten(avgpool(downsample_L(S_L)));  logits_L = fc_bL(f_L)

Every module has the single width C (``width``; the faithful choice, the default, is the
last stage's channel count, 512 x expansion). ``r`` is reduction(T_{L+1}) / reduction(T_L)
(2 for ResNets and VGG) and the auxiliary branch ``downsample_L`` is a k x k, stride-k
conv with k = reduction(T_B) / reduction(T_L), so each level reaches the T_B size before
pooling. B (``branch_stage``) is the deepest stage whose map is at least 2x2 at the input
size: at 32 px, B = 4 and k = 8, 4, 2 for the CIFAR ResNets, B = 3 and k = 4, 2, 1 for
CIFAR VGG, whose T4 is 1x1 (both as in the official code).

Input sizes whose stage maps do not halve exactly (ImageNet ResNet-18 at 112 px: T1..T4 are
28, 14, 7, 4, as a stride-2 convolution rounds 7/2 up; at 299 px 75, 38, 19, 10): the official
code upsamples by the fixed factor r, which gives 8x8 from 4x4 and cannot be added to the 7x7
lateral. Here ``upsample_{L-1}`` interpolates to T_L's actual size instead. With
``align_corners=True`` the interpolation weights depend only on the input and output sizes
((in - 1) / (out - 1)), so where the sizes are exactly r-fold this is the official x r upsampling,
bit for bit. The auxiliary branch's k x k stride-k convolution meets sizes that k does not divide
(at 112 px: 28/8, 14/4, 7/2, where a plain convolution drops the last 4, 2 and 1 rows and columns
and gives 3x3, not T4's 4x4): each branch zero-pads its input at the bottom and right to the next
multiple of k (``student_branches.pad_to_patches``), so it keeps the official patch grid, adds the
partial patches at the edge, and gives ceil(size / k) cells. That is T_B's size whenever each stage
rounds its halving up (ResNets, and most strided-convolution networks; at 112 px 4x4, at 299 px
10x10), is never empty, uses every position of S_L, and pads nothing where k divides the size
(at 224 px 56/8 = 28/4 = 14/2 = 7: the official branch). The students' pooled features are thus
defined at every input size, and identical to the official ones wherever the sizes divide.

Per-level widths (an ablation, not in the paper): ``width`` may instead be a mapping
{1: C1, 2: C2, 3: C3} (all three levels, even unrequested ones, because the top-down
path's width at S4 is C3). Level L's modules then have width C_L, with C4 := C3::

    S4 = lateral_3(T4)                      width C3
    upsample_j: S(j+2) (C_{j+2}) -> C_{j+1}  (the 1x1 conv changes the width)
    lateral_j:  T(j+1) -> C_{j+1}
    fuse_L: 2 C_L -> C_L;  downsample_L: C_L -> C_L;  fc_bL: Linear(C_L, classes)

so student L's feature has C_L entries. An int width gives exactly the modules above.

Width presets (``resolve_student_width``): ``"faithful"`` is the single C above (what
``None`` gives), ``"stage"`` the mapping C_L = channels of T_L, i.e. {1: c1, 2: c2, 3: c3},
which keeps the students about as wide as the network they read (on mobile networks the
faithful C, the last stage's width everywhere, dwarfs the network itself).

Branch types (``branch``, an ablation, not in the paper): ``"conv"`` is the faithful
auxiliary branch below; ``"depthwise"`` (its k x k conv depthwise, C k² instead of C² k²
weights) and ``"bottleneck"`` (1x1 C -> C/4, k x k stride k at C/4, 1x1 back to C) are
in ``student_branches.py``. All keep the name ``downsample{L}``, input and output width
C_L and the head ``fc_b{L}`` = Linear(C_L, classes).

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

``fast`` (fixed at construction) runs the exact rewrites of ``students_fast.py``;
``forward_reference`` is the plain formulation, module by module as in the official code.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from teskd.models.backbones.base import StageInfo
from teskd.models.student_blocks import AuxiliaryBranch, ConvBNReLU, UpsampleBlock
from teskd.models.student_branches import BottleneckBranch, DepthwiseBranch, PatchBranch
from teskd.models.students_fast import fast_forward

LEVELS = (1, 2, 3)
BRANCH_TYPES = ("conv", "depthwise", "bottleneck")  # "conv": the faithful AuxiliaryBranch
WIDTH_PRESETS = ("faithful", "stage")
Outputs = dict[str, tuple[torch.Tensor, torch.Tensor]]
Width = int | Mapping[int, int] | str | None


BRANCHES: dict[str, type[PatchBranch]] = {
    "conv": AuxiliaryBranch, "depthwise": DepthwiseBranch, "bottleneck": BottleneckBranch}


def resolve_student_width(spec: Width, stage_info: Sequence[StageInfo],
                          default: Width = "faithful") -> int | dict[int, int]:
    """The students' width(s) from a width specification.

    ``spec``: an int C, a mapping {1: C1, 2: C2, 3: C3}, ``"faithful"`` (C = the last stage's
    channels), ``"stage"`` (C_L = the channels of stage T_L) or None, which means ``default``
    (a backbone's ``default_student_width``; "faithful" unless it says otherwise).
    """
    if spec is None:
        spec = "faithful" if default is None else default
    if isinstance(spec, str):
        if spec == "faithful":
            return stage_info[-1].channels
        if spec == "stage":
            return {level: stage_info[level - 1].channels for level in LEVELS}
        raise ValueError(f"unknown student width {spec!r}; choose an int, a mapping {{1: C1, 2: C2, 3: C3}}, "
                         f"or one of {', '.join(WIDTH_PRESETS)}")
    return dict(spec) if isinstance(spec, Mapping) else spec


def _ratio(deep: StageInfo, shallow: StageInfo, what: str) -> int:
    """reduction(deep) / reduction(shallow), which must be an integer >= 1."""
    if deep.reduction < shallow.reduction or deep.reduction % shallow.reduction != 0:
        raise ValueError(f"students need integer stage-reduction ratios >= 1 for the {what}, "
                         f"got reductions {shallow.reduction} and {deep.reduction}")
    return deep.reduction // shallow.reduction


def branch_stage(stage_info: Sequence[StageInfo], input_size: int) -> int:
    """The deepest stage (1-based) whose map is at least 2x2 for ``input_size`` px inputs."""
    stages = [i + 1 for i, info in enumerate(stage_info) if input_size // info.reduction >= 2]
    if not stages:
        raise ValueError(f"no stage map is 2x2 or larger at input size {input_size}")
    return stages[-1]


class HierarchicalStudents(nn.Module):
    """The students' top-down fusion, auxiliary branches and heads (see module docstring).

    ``width``: C, or {1: C1, 2: C2, 3: C3}, or a preset ("faithful", "stage"; see
    ``resolve_student_width``), or None for the faithful C (the last stage's channels).
    ``branch``: the auxiliary branch type, one of ``BRANCH_TYPES`` ("conv" is the faithful one).
    ``input_size`` (px) sets ``branch_stage``. ``init``, if given, is applied to
    the built modules (the official VGG and ResNeXt models run their backbone's
    initialisation over the students too). The caller validates levels and widths.
    """

    def __init__(self, stage_info: Sequence[StageInfo], num_classes: int,
                 width: Width = None, levels: Sequence[int] = LEVELS,
                 input_size: int = 32, fast: bool = True, init: Callable[[nn.Module], None] | None = None,
                 branch: str = "conv"):
        super().__init__()
        if len(stage_info) != 4 or not levels or not set(levels) <= set(LEVELS):
            raise ValueError(f"students need 4 stages and levels among {LEVELS}, got {len(stage_info)} "
                             f"stages and levels {list(levels)}")
        if branch not in BRANCHES:
            raise ValueError(f"unknown student branch type {branch!r}; choose one of {', '.join(BRANCH_TYPES)}")
        self.branch_type = branch
        width = resolve_student_width(width, stage_info)
        self.widths = dict(width) if isinstance(width, Mapping) else dict.fromkeys(LEVELS, width)
        if sorted(self.widths) != list(LEVELS):
            raise ValueError(f"per-level student widths need exactly the levels {LEVELS}, got {self.widths}")
        self.levels = tuple(sorted(set(levels)))
        self.branch_stage = branch_stage(stage_info, input_size)
        self._fast = fast
        self._build(tuple(stage_info), num_classes)
        if init is not None:
            init(self)

    def _build(self, stage_info: tuple[StageInfo, ...], num_classes: int) -> None:
        lowest, widths = self.levels[0], self.widths  # the path stops at the shallowest requested level

        def level_width(level: int) -> int:  # C_L, with C4 := C3 (the width of S4)
            return widths[min(level, 3)]

        # lateral i reads T(i+1) and has the width of S(i+1); needed for the levels lowest..3 and for T4
        self.laterals = nn.ModuleDict(
            {str(i): ConvBNReLU(stage_info[i].channels, level_width(i + 1)) for i in range(lowest - 1, 4)})
        # upsample j brings S(j+2) to the size and width of S(j+1); fuse_L builds S_L for L = j+1
        self.upsample = nn.ModuleDict({
            str(j): UpsampleBlock(level_width(j + 2), level_width(j + 1),
                                  _ratio(stage_info[j + 1], stage_info[j], "top-down upsampling"))
            for j in range(lowest - 1, 3)})
        for level in range(lowest, 4):
            self.add_module(f"fuse_{level}", ConvBNReLU(2 * widths[level], widths[level]))
        target = stage_info[self.branch_stage - 1]
        self.kernels: dict[int, int] = {}  # k of each requested level's branch
        for level in self.levels:
            kernel = self.kernels[level] = _ratio(target, stage_info[level - 1], f"auxiliary branch of level {level}")
            self.add_module(f"downsample{level}", BRANCHES[self.branch_type](widths[level], kernel))
            self.add_module(f"fc_b{level}", nn.Linear(widths[level], num_classes))

    @property
    def fast(self) -> bool:
        """Whether ``forward`` runs the exact rewrites of ``students_fast.py`` (fixed at construction)."""
        return self._fast

    def fuse(self, level: int) -> ConvBNReLU:
        return self.get_submodule(f"fuse_{level}")

    def branch(self, level: int) -> PatchBranch:
        return self.get_submodule(f"downsample{level}")

    def head(self, level: int) -> nn.Linear:
        return self.get_submodule(f"fc_b{level}")

    def top_down(self, stages: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The fused maps S_L for L = 3 down to the shallowest requested level."""
        fused: dict[int, torch.Tensor] = {}
        above = self.laterals["3"](stages[3])  # S4
        for level in range(3, self.levels[0] - 1, -1):
            # to T_L's actual size: x r is wrong where a stage rounded its halving (7x7 -> 4x4)
            up = self.upsample[str(level - 1)](above, stages[level - 1].shape[-2:])
            lateral = self.laterals[str(level - 1)](stages[level - 1])
            above = self.fuse(level)(torch.cat([up + lateral, up], dim=1))
            fused[level] = above
        return fused

    def forward(self, stages: Sequence[torch.Tensor]) -> Outputs:
        """``{"student<L>": (logits, feature)}`` for each requested level, shallowest first;
        ``feature`` is the pooled output of the level's auxiliary branch, shape (B, C_L)."""
        assert len(stages) == 4, f"students read the 4 stage outputs T1..T4, got {len(stages)}"
        return fast_forward(self, stages) if self._fast else self.forward_reference(stages)

    def forward_reference(self, stages: Sequence[torch.Tensor]) -> Outputs:
        """The plain formulation, module by module as in the official code."""
        fused = self.top_down(stages)
        out: Outputs = {}
        for level in self.levels:
            feature = torch.flatten(nn.functional.adaptive_avg_pool2d(self.branch(level)(fused[level]), 1), 1)
            out[f"student{level}"] = (self.head(level)(feature), feature)
        return out
