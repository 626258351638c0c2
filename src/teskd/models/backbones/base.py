"""The contract every backbone (= deployable teacher) fulfils."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    """Describes one of the backbone's four stage outputs (like timm's feature_info)."""

    channels: int
    reduction: int  # spatial stride relative to the input image


class Backbone(nn.Module):
    """A 4-stage CNN classifier that knows nothing about students.

    Subclasses set ``stage_info`` (4 entries, shallow to deep) and ``num_features``
    (the size of the pooled feature fed to the head), and implement
    ``forward_stages`` and ``forward_head``. ``forward`` returns logits only, so
    the module (and its state dict) is exactly what gets deployed.

    ``branch_stage`` (1-based) names the stage whose resolution TESKD's student
    auxiliary branches reduce every level to before pooling: 4 (the T4 size) for
    the ResNets, 3 for VGG, whose T4 is 1x1 (official code).
    """

    stage_info: tuple[StageInfo, ...]
    num_features: int
    branch_stage: int = 4
    # the default forward: stem -> these four stage modules -> global average pool -> head module
    stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
    head_name: str = "fc"

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.forward_stem(x)
        stages = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            stages.append(x)
        return stages

    def forward_head(self, t4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, pooled_feature)``; the feature has shape (B, num_features)."""
        feature = torch.flatten(nn.functional.adaptive_avg_pool2d(t4, 1), 1)
        return getattr(self, self.head_name)(feature), feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])[0]

    def init_students(self, students: nn.Module) -> None:
        """Initialise student modules built for this backbone the way its official code does.

        The official ResNet and SE-ResNet models leave the students at PyTorch's
        defaults (this no-op); the official VGG and ResNeXt models run their init
        loop over the whole model, students included, and override this.
        """
