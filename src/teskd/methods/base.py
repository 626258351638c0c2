"""The method contract: a batch in, a loss with named parts and named logits out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from teskd.config import MethodParams, register_method_params
from teskd.models.backbones.base import Backbone


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to backpropagate
    parts: dict[str, torch.Tensor]  # named, weighted loss terms (for logs); they sum to ``loss``
    logits: dict[str, torch.Tensor]  # per branch; "teacher" is the deployed network


class Method(nn.Module):
    """A training method wraps the backbone (the deployed teacher) and any helper modules.

    Subclasses implement ``forward_train`` and ``forward_eval``; the engine never
    looks inside a method beyond these names, so adding a method is one file
    plus its ``@register_method`` line.
    """

    name: ClassVar[str]
    params_class: ClassVar[type[MethodParams]]

    def __init__(self, backbone: Backbone, num_classes: int, params: MethodParams):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.params = params

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores per branch (argmax = prediction); must include ``teacher``."""
        raise NotImplementedError

    @property
    def deploy_module(self) -> Backbone:
        """The network that ships: the plain backbone, students dropped."""
        return self.backbone


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name=<cls.name>``."""
    METHODS[cls.name] = cls
    register_method_params(cls.name)(cls.params_class)
    return cls
