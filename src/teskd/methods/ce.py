"""Plain cross-entropy training of the backbone: the baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teskd.config import MethodParams
from teskd.methods.base import Method, StepOutput, register_method


@dataclass
class CEParams(MethodParams):
    name: str = "ce"
    label_smoothing: float = 0.0

    def validate(self) -> None:
        from teskd.errors import TeskdError

        if not 0.0 <= self.label_smoothing < 1.0:
            raise TeskdError(f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@register_method
class CE(Method):
    name = "ce"
    params_class = CEParams

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        logits = self.backbone(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.params.label_smoothing)
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits={self.deploy_branch: logits})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.deploy_branch: self.backbone(images)}
