"""TESKD: the backbone (teacher) trained jointly with hierarchical students on its stage features.

Loss (official code, spec section 3), with teacher logits z_t and student logits z_k:

    ce_weight * [w_t CE(z_t) + sum_k w_k CE(z_k)]
  + kd_weight * sum_k T^2 KL(softmax(z_t/T) + eps || softmax(z_k/T))     (z_t not detached by default)
  + feat_weight * sum_k sum (f_k - sg(f_t))^2 [f_k > 0 or f_t > 0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.losses import kd_kl, masked_feature_l2
from teskd.methods.base import Method, StepOutput, register_method
from teskd.models.students import HierarchicalStudents

LEVELS = (1, 2, 3)


@dataclass
class TeskdParams(MethodParams):
    name: str = "teskd"
    temperature: float = 4.0
    ce_weight: float = 0.2
    kd_weight: float = 0.8
    feat_weight: float = 1e-7
    detach_teacher: bool = False  # official: False (the KL gradient reaches the teacher too)
    kl_eps: float = 1e-7
    # per-branch CE weights; keys "teacher" and "student1".."student3" (missing keys mean 1.0)
    branch_ce_weights: dict[str, float] = field(default_factory=dict)
    levels: list[int] = field(default_factory=lambda: list(LEVELS))  # 1 = shallowest (T1) student
    student_width: int | None = None  # None: the faithful C = last stage's channels

    def validate(self) -> None:
        if self.temperature <= 0:
            raise TeskdError(f"method.temperature must be > 0, got {self.temperature}")
        for key in ("ce_weight", "kd_weight", "feat_weight", "kl_eps"):
            if getattr(self, key) < 0:
                raise TeskdError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if not self.levels or len(set(self.levels)) != len(self.levels) or any(
                lvl not in LEVELS for lvl in self.levels):
            raise TeskdError(f"method.levels must be distinct student levels among {list(LEVELS)}, "
                             f"got {self.levels}")
        valid = {"teacher", *(f"student{lvl}" for lvl in self.levels)}
        for key, weight in self.branch_ce_weights.items():
            if key not in valid:
                raise TeskdError(f"method.branch_ce_weights has unknown branch {key!r}; "
                                 f"valid: {sorted(valid)}")
            if weight < 0:
                raise TeskdError(f"method.branch_ce_weights.{key} must be >= 0, got {weight}")
        if self.student_width is not None and self.student_width < 1:
            raise TeskdError(f"method.student_width must be >= 1, got {self.student_width}")


@register_method
class TESKD(Method):
    name = "teskd"
    params_class = TeskdParams

    def __init__(self, backbone, num_classes: int, params: TeskdParams):
        super().__init__(backbone, num_classes, params)
        width = params.student_width or backbone.stage_info[-1].channels
        self.students = HierarchicalStudents(backbone.stage_info, num_classes, width=width,
                                             levels=tuple(sorted(params.levels)))

    def _branches(self, images: torch.Tensor):
        stages = self.backbone.forward_stages(images)
        logits_t, feat_t = self.backbone.forward_head(stages[-1])
        students = self.students(stages)
        return logits_t, feat_t, students

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        p = self.params
        logits_t, feat_t, students = self._branches(images)
        w = p.branch_ce_weights
        ce = w.get("teacher", 1.0) * F.cross_entropy(logits_t, labels)
        kd = logits_t.new_zeros((), dtype=torch.float32)
        feat = logits_t.new_zeros((), dtype=torch.float32)
        for name, (logits_s, feat_s) in students.items():
            ce = ce + w.get(name, 1.0) * F.cross_entropy(logits_s, labels)
            kd = kd + kd_kl(logits_s, logits_t, p.temperature, eps=p.kl_eps, detach_teacher=p.detach_teacher)
            feat = feat + masked_feature_l2(feat_s, feat_t)
        parts = {"ce": p.ce_weight * ce, "kd": p.kd_weight * kd, "feat": p.feat_weight * feat}
        loss = parts["ce"] + parts["kd"] + parts["feat"]
        logits = {"teacher": logits_t, **{name: out[0] for name, out in students.items()}}
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()}, logits=logits)

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_t, _, students = self._branches(images)
        out = {"teacher": logits_t, **{name: s[0] for name, s in students.items()}}
        if len(students) > 1:
            # the students' ensemble: mean of their softmax probabilities
            probs = torch.stack([s[0].float().softmax(dim=1) for s in students.values()])
            out["students_ensemble"] = probs.mean(dim=0)
        return out
