"""Classic knowledge distillation (Hinton et al.; the recipe of RepDistiller): a frozen, pretrained
network teaches the backbone.

    loss = ce_weight * CE(z_s) + kd_weight * T^2 * KL(sg softmax(z_t / T) || softmax(z_s / T))

with the KL summed over classes and averaged over the batch (``batchmean``, no epsilon). Defaults:
T = 4, ce_weight = 0.1, kd_weight = 0.9.

The pretrained network (branch ``teacher``; its module is ``kd_teacher``) comes from ``method.teacher``: a
teskd run directory (its ``checkpoints/<teacher_checkpoint>.pt``), a checkpoint ``.pt`` or a
``deployed.safetensors`` (or older ``teacher.safetensors``) export. It is rebuilt from the file's own
architecture and width (the checkpoint's config, or the export's metadata) and loaded with teskd's
loaders, which never unpickle code. It never trains: it is a frozen module (outside the optimizer,
kept in eval mode, ``requires_grad`` off, run under ``no_grad``). Its weights are part of this
method's state dict, so checkpoints hold the exact teacher used; it is evaluated each epoch (for
reference) but never deployed: the backbone (branch ``student``) is. Runs written before this naming
call the student ``teacher`` and the teacher ``kd_teacher``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from teskd.config import MethodParams
from teskd.losses import soft_kl
from teskd.errors import TeskdError
from teskd.methods.base import Method, StepOutput, register_method


@dataclass
class KDParams(MethodParams):
    name: str = "kd"
    path_fields: ClassVar[tuple[str, ...]] = ("teacher",)
    teacher: str = ""  # required: a run directory, a checkpoint .pt or a teacher.safetensors
    teacher_checkpoint: str = "best"  # for a run directory: checkpoints/best.pt or checkpoints/last.pt
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self) -> None:
        if not self.teacher:
            raise TeskdError("method kd needs method.teacher: a run directory, a checkpoint .pt or a "
                             "teacher.safetensors of the pretrained teacher")
        if self.teacher_checkpoint not in ("best", "last"):
            raise TeskdError(f"method.teacher_checkpoint must be best or last, got {self.teacher_checkpoint!r}")
        self.require(positive=["temperature"], non_negative=["ce_weight", "kd_weight"])


def load_pretrained_teacher(target: str, which: str, num_classes: int) -> tuple[nn.Module, str]:
    """The deployed network of a run directory, checkpoint or teacher.safetensors; returns (module, description)."""
    from teskd.deploy.source import load_deployed

    path = Path(target).expanduser()
    if path.suffix.lower() in (".onnx", ".pt2"):
        raise TeskdError(f"method.teacher {path}: a compiled {path.suffix[1:]} export cannot be loaded as a "
                         f"network here; give its run directory, a checkpoint .pt or a teacher.safetensors")
    deployed = load_deployed(path, which)
    info = deployed.info
    if info.num_classes != num_classes:
        raise TeskdError(f"method.teacher {path} predicts {info.num_classes} classes, but the data has {num_classes}")
    return deployed.model, f"{info.arch} (width_mult {info.width_mult:g}) from {deployed.source}"


@register_method
class KD(Method):
    name = "kd"
    params_class = KDParams
    deploy_branch = "student"

    def __init__(self, backbone, num_classes: int, params: KDParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        try:
            with warnings.catch_warnings():
                if torch.empty(0).is_meta:  # built for shapes only (teskd info): loading the weights is a no-op
                    warnings.simplefilter("ignore")
                teacher, self.teacher_source = load_pretrained_teacher(params.teacher, params.teacher_checkpoint,
                                                                       num_classes)
        except TeskdError as exc:
            text = str(exc)
            raise TeskdError(text if text.startswith("method.teacher") else f"method.teacher: {text}") from exc
        teacher.requires_grad_(False)
        self.kd_teacher = teacher.eval()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.kd_teacher]

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.kd_teacher(images)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        p = self.params
        logits_t = self._teacher_logits(images)
        logits_s = self.backbone(images)
        ce = F.cross_entropy(logits_s.float(), labels)
        kd = soft_kl(logits_s, logits_t, p.temperature)
        parts = {"ce": p.ce_weight * ce, "kd": p.kd_weight * kd}
        loss = parts["ce"] + parts["kd"]
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()},
                          logits={"student": logits_s, "teacher": logits_t})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.backbone(images), "teacher": self._teacher_logits(images)}
