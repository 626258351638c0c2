"""Label smoothing: cross-entropy against `(1 - eps) * one-hot + eps / C` (F.cross_entropy(label_smoothing=eps))."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teskd.config import MethodParams
from teskd.errors import TeskdError
from teskd.methods.base import Method, StepOutput, register_method


@dataclass
class LabelSmoothingParams(MethodParams):
    name: str = "label_smoothing"
    smoothing: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise TeskdError(f"method.smoothing must be in [0, 1), got {self.smoothing}")


@register_method
class LabelSmoothing(Method):
    name = "label_smoothing"
    params_class = LabelSmoothingParams

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        logits = self.backbone(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.params.smoothing)
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits={"teacher": logits})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher": self.backbone(images)}
