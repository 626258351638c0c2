"""The training-time network: the backbone (the teacher, what ships) plus optional students."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from teskd.models.backbones.base import Backbone
from teskd.models.students import HierarchicalStudents


@dataclass
class NetworkOutput:
    """Named branch outputs: keys "teacher" and "student1".."student3" (those built).

    ``logits[name]`` is (B, num_classes); ``features[name]`` is the branch's pooled
    feature (B, C): the pooled T4 for the teacher, the pooled auxiliary-branch output
    for a student.
    """

    logits: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]


def default_student_width(backbone: Backbone) -> int:
    """The faithful student width C: the last stage's channels (512 x expansion x width_mult)."""
    return backbone.stage_info[-1].channels


class TeskdNetwork(nn.Module):
    """``backbone`` (deployed alone) and ``students`` (None: teacher only) on its stage features."""

    def __init__(self, backbone: Backbone, students: HierarchicalStudents | None = None):
        super().__init__()
        self.backbone = backbone
        self.students = students

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        stages = self.backbone.forward_stages(x)
        logits, feature = self.backbone.forward_head(stages[-1])
        out = NetworkOutput(logits={"teacher": logits}, features={"teacher": feature})
        if self.students is not None:
            for name, (s_logits, s_feature) in self.students(stages).items():
                out.logits[name] = s_logits
                out.features[name] = s_feature
        return out
