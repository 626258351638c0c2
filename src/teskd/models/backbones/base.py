"""The contract every backbone (= deployable teacher) fulfils."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    """Describes one of the backbone's four stage outputs (like timm's feature_info)."""

    channels: int
    reduction: int  # spatial stride relative to the input image
    module: str  # the name of the backbone's child module that outputs it


class Features(NamedTuple):
    """One forward pass of a backbone, as the methods read it."""

    stages: list[torch.Tensor]  # T1..T4, shallow to deep
    logits: torch.Tensor  # the deployed network's output
    feature: torch.Tensor  # the pooled feature, (B, num_features)


class Backbone(nn.Module):
    """A 4-stage CNN classifier that knows nothing about students.

    Subclasses set ``stage_info`` (4 entries, shallow to deep) and ``num_features``
    (the size of the pooled feature fed to the head ``head_name``) and implement
    ``forward_stem``; the default ``forward_stages`` runs the stem, then each stage
    module in turn. ``forward`` returns logits only, so the module (and its state
    dict) is exactly what gets deployed. Methods read a whole pass through
    ``forward_features``; only methods that copy or re-run stage 4 (ONE, OKDDip) call the
    stage modules themselves, which needs ``splittable`` (a wrapped library network runs
    whole, see ``library.py``).
    """

    stage_info: tuple[StageInfo, ...]
    num_features: int
    head_name: str = "fc"
    splittable: ClassVar[bool] = True  # stem, stage modules and head can be called one by one
    # the family's official weight initialisation (None: PyTorch's defaults); the official
    # training models apply it to every module they hold, so it is exposed for reuse
    weight_init: ClassVar[Callable[[nn.Module], None] | None] = None
    # what TESKD's students are on this backbone when the config does not say (method.levels,
    # method.student_width): the paper's three at the faithful width; a family may choose otherwise
    default_student_levels: ClassVar[tuple[int, ...]] = (1, 2, 3)
    default_student_width: ClassVar[int | str] = "faithful"  # a preset name or a channel count
    # the registry name and width that built this network (``build_backbone`` records them, so that a method
    # can build another of the same kind, e.g. DML's peer); None for a network built without the registry
    arch: str | None = None
    width_mult: float | None = None

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.forward_stem(x)
        stages = []
        for info in self.stage_info:
            x = getattr(self, info.module)(x)
            stages.append(x)
        return stages

    def forward_head(self, t4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, pooled_feature)``; the feature has shape (B, num_features)."""
        feature = torch.flatten(nn.functional.adaptive_avg_pool2d(t4, 1), 1)
        return getattr(self, self.head_name)(feature), feature

    def forward_features(self, x: torch.Tensor) -> Features:
        """The stage maps, the logits and the pooled feature of one pass."""
        stages = self.forward_stages(x)
        logits, feature = self.forward_head(stages[-1])
        return Features(stages, logits, feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])[0]
