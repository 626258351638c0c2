"""TESKD: the backbone (teacher) trained jointly with hierarchical students on its stage features.

Loss (official code, spec section 3), with teacher logits z_t and student logits z_k:

    ce_weight * [w_t CE(z_t) + sum_k w_k CE(z_k)]
  + kd_weight * sum_k T^2 KL(softmax(z_t/T) + eps || softmax(z_k/T))     (z_t not detached by default)
  + feat_weight * sum_k sum (f_k - sg(f_t))^2 [f_k > 0 or f_t > 0]

where f_k is student k's pooled feature, or, when its width differs from the teacher's feature
size (``student_width`` not faithful), its projection P_k f_k by a bias-free linear map
(``projections["student<k>"]``, trained with the students, not deployed; ``feature_projection``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.losses import kd_kl, masked_feature_l2, sigmoid_ramp
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models.complexity import count_params
from teskd.models.students import BRANCH_TYPES, LEVELS, WIDTH_PRESETS, HierarchicalStudents, resolve_student_width

KD_DIRECTIONS = ("teacher_to_student", "student_to_teacher")


@dataclass
class TeskdParams(MethodParams):
    name: str = "teskd"
    temperature: float = 4.0
    ce_weight: float = 0.2
    kd_weight: float = 0.8
    feat_weight: float = 1e-7
    detach_teacher: bool = False  # official: False (the KL gradient reaches the teacher too)
    # teacher_to_student (official): KL(p_teacher + eps || p_student), the student matches the teacher;
    # student_to_teacher: KL(p_student + eps || p_teacher), the roles of the two distributions swapped
    kd_direction: str = "teacher_to_student"
    kl_eps: float = 1e-7
    # an ablation (not in the paper): the KD weight ramps up as exp(-5 (1 - epoch/R)^2) over the first R
    # epochs (0-based epoch; ONE's ramp), so the students' early noise does not reach the teacher; 0 = off
    kd_ramp_epochs: int = 0
    feature_loss: bool = True  # the masked feature term (off: as if feat_weight were 0)
    # per-branch CE weights; keys "teacher" and "student1".."student3" (missing keys mean 1.0)
    branch_ce_weights: dict[str, float] = field(default_factory=dict)
    # 1 = shallowest (T1) student; None: the backbone's default_student_levels ((1, 2, 3) for the paper's
    # networks; the deepest student alone for library networks, the cheapest configuration measured best)
    levels: list[int] | None = None
    # "faithful": the single C = last stage's channels (the paper); "stage": C_L = the channels of stage
    # T_L, {1: c1, 2: c2, 3: c3}; an int: one width for all; a mapping {1: C1, 2: C2, 3: C3}: a width per
    # level (all three levels); None: the backbone's default_student_width ("faithful" for the paper's
    # backbones, which do not set it)
    student_width: int | str | dict[int, int] | None = None
    # the students' auxiliary branch (an ablation): "conv" (the paper's dense k x k stride-k conv + 1x1),
    # "depthwise" (the k x k conv depthwise), "bottleneck" (1x1 to C/4, k x k at C/4, 1x1 back to C)
    student_branch: str = "conv"
    # when the feature loss is on and a requested student's width differs from the teacher's feature size:
    # compare a bias-free linear projection of the student's feature (trained, not deployed); false: error
    feature_projection: bool = True
    fast_students: bool = True  # exact faster formulation of the students (students_fast.py)
    # recompute the students' activations in the backward pass instead of keeping them (less memory,
    # ~one extra students forward per step); results are unchanged, BN running statistics included
    checkpoint_students: bool = False

    def validate(self) -> None:
        self.require(positive=["temperature"],
                     non_negative=["ce_weight", "kd_weight", "feat_weight", "kl_eps", "kd_ramp_epochs"])
        if self.levels is not None and (not self.levels or len(set(self.levels)) != len(self.levels) or any(
                lvl not in LEVELS for lvl in self.levels)):
            raise TeskdError(f"method.levels must be distinct student levels among {list(LEVELS)}, "
                             f"got {self.levels}")
        valid = {"teacher", *(f"student{lvl}" for lvl in (self.levels or LEVELS))}
        for key, weight in self.branch_ce_weights.items():
            if key not in valid:
                raise TeskdError(f"method.branch_ce_weights has unknown branch {key!r}; "
                                 f"valid: {sorted(valid)}")
            if weight < 0:
                raise TeskdError(f"method.branch_ce_weights.{key} must be >= 0, got {weight}")
        if self.kd_direction not in KD_DIRECTIONS:
            raise TeskdError(f"method.kd_direction must be one of {', '.join(KD_DIRECTIONS)}, "
                             f"got {self.kd_direction!r}")
        if self.student_branch not in BRANCH_TYPES:
            raise TeskdError(f"method.student_branch must be one of {', '.join(BRANCH_TYPES)}, "
                             f"got {self.student_branch!r}")
        widths = self.student_width
        if isinstance(widths, str):
            if widths not in WIDTH_PRESETS:
                raise TeskdError(f"method.student_width must be an int, a mapping {{1: C1, 2: C2, 3: C3}}, null "
                                 f"or one of {', '.join(WIDTH_PRESETS)}, got {widths!r}")
            widths = None
        elif isinstance(widths, dict):
            if sorted(widths) != list(LEVELS):
                raise TeskdError(f"method.student_width as a mapping needs exactly the levels 1, 2, 3 "
                                 f"(got {sorted(widths)})")
            widths = list(widths.values())
        elif widths is not None:
            widths = [widths]
        if widths is not None and any(w < 1 for w in widths):
            raise TeskdError(f"method.student_width must be >= 1, got {self.student_width}")


@contextmanager
def restore_bn_buffers(module: torch.nn.Module):
    """Undo the BN running-statistics update of a checkpointed segment's recomputation.

    The forward already updated them once; recomputing in backward would update them again.
    """
    saved = [(b, b.clone()) for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in
             ("running_mean", "running_var", "num_batches_tracked")]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@register_method
class TESKD(Method):
    name = "teskd"
    params_class = TeskdParams
    deploy_branch = "teacher"  # TESKD's backbone really is the students' teacher

    def __init__(self, backbone, num_classes: int, params: TeskdParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        levels = list(params.levels if params.levels is not None else backbone.default_student_levels)
        names = {f"student{lvl}" for lvl in levels}
        unknown = sorted(k for k in params.branch_ce_weights if k != "teacher" and k not in names)
        if unknown:
            raise TeskdError(f"method.branch_ce_weights has {', '.join(unknown)}, but the students are levels {levels}")
        width = resolve_student_width(params.student_width, backbone.stage_info,
                                      default=backbone.default_student_width)
        # initialised like the backbone, as the official models run their init over every module
        self.students = HierarchicalStudents(backbone.stage_info, num_classes, width=width,
                                             levels=levels, input_size=input_size,
                                             fast=params.fast_students, init=backbone.weight_init,
                                             branch=params.student_branch)
        self.use_feature_loss = params.feature_loss and params.feat_weight > 0
        # training-only helpers: student features projected to the teacher's feature size (levels whose
        # width differs); None when every compared width matches, so the faithful state dict is unchanged
        self.projections: nn.ModuleDict | None = None
        if self.use_feature_loss:
            wrong = {lvl: self.students.widths[lvl] for lvl in sorted(levels)
                     if self.students.widths[lvl] != backbone.num_features}
            if wrong and not params.feature_projection:
                raise TeskdError(f"the feature loss compares student features with the teacher's "
                                 f"{backbone.num_features}-d feature, but student widths are {wrong}; "
                                 f"set method.feature_projection=true, method.feature_loss=false or matching widths")
            if wrong:
                self.projections = nn.ModuleDict({f"student{lvl}": nn.Linear(w, backbone.num_features, bias=False)
                                                  for lvl, w in wrong.items()})

    def _branches(self, images: torch.Tensor):
        stages, logits_t, feat_t = self.backbone.forward_features(images)
        if self.params.checkpoint_students and self.training and torch.is_grad_enabled():
            students = checkpoint(self.students, stages, use_reentrant=False,
                                  context_fn=lambda: (nullcontext(), restore_bn_buffers(self.students)))
        else:
            students = self.students(stages)
        return logits_t, feat_t, students

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        logits_t, feat_t, students = self._branches(images)
        w = p.branch_ce_weights
        ce = w.get("teacher", 1.0) * F.cross_entropy(logits_t, labels)
        kd = logits_t.new_zeros((), dtype=torch.float32)
        feat = logits_t.new_zeros((), dtype=torch.float32)
        target_t = logits_t.detach() if p.detach_teacher else logits_t
        for name, (logits_s, feat_s) in students.items():
            ce = ce + w.get(name, 1.0) * F.cross_entropy(logits_s, labels)
            if p.kd_direction == "teacher_to_student":
                kd = kd + kd_kl(logits_s, target_t, p.temperature, eps=p.kl_eps)
            else:
                kd = kd + kd_kl(target_t, logits_s, p.temperature, eps=p.kl_eps)
            if self.use_feature_loss:
                if self.projections is not None and name in self.projections:
                    feat_s = self.projections[name](feat_s)
                feat = feat + masked_feature_l2(feat_s, feat_t)
        kd_weight = p.kd_weight * sigmoid_ramp(self.epoch, p.kd_ramp_epochs)
        parts = {"ce": p.ce_weight * ce, "kd": kd_weight * kd, "feat": p.feat_weight * feat}
        loss = parts["ce"] + parts["kd"] + parts["feat"]
        logits = {"teacher": logits_t, **{name: out[0] for name, out in students.items()}}
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()}, logits=logits)

    def student_param_count(self) -> int:
        """Parameters that train beside the deployed network: the students and the feature projections."""
        return count_params(self.students) + (count_params(self.projections) if self.projections is not None else 0)

    def describe_students(self) -> str:
        """One line on what the students cost: levels, widths, branch type and kernels, projections, parameters."""
        s = self.students
        levels = ",".join(str(lvl) for lvl in s.levels)
        widths = "/".join(str(s.widths[lvl]) for lvl in LEVELS)
        kernels = "/".join(str(s.kernels[lvl]) for lvl in s.levels)
        if not self.use_feature_loss:
            projection = "no feature loss"
        elif self.projections is None:
            projection = "no projection"
        else:
            projection = (f"projection to {self.backbone.num_features}-d for "
                          f"{','.join(self.projections.keys())}")
        students = count_params(s)
        total = self.student_param_count()
        count = f"{total:,} parameters"
        if total != students:
            count += f" (students {students:,} + projections {total - students:,})"
        return (f"levels {levels} · widths {widths} (levels 1/2/3) · {s.branch_type} branches (k {kernels}) · "
                f"branch at stage {s.branch_stage} · {projection} · {count}")

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_t, _, students = self._branches(images)
        out = {"teacher": logits_t, **{name: s[0] for name, s in students.items()}}
        if len(students) > 1:
            # the students' ensemble: mean of their softmax probabilities
            probs = torch.stack([s[0].float().softmax(dim=1) for s in students.values()])
            out["students_ensemble"] = probs.mean(dim=0)
        return out
