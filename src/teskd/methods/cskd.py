"""CS-KD, class-wise self-knowledge distillation (Yun et al., CVPR 2020).

Reference: alinlab/cs-kd (``train.py``, ``datasets.py``). Its pair sampler yields 2B images per batch:
rows 0..B-1 the batch, row B+i a random training sample of the same class as row i (possibly the same
image); the trainer's loaders do the same when ``batch_pairing == "same_class"``. With z the logits of
the first half (gradients) and z' those of the second (a separate forward under no_grad, in train mode,
so with its own BN batch statistics, as in the reference)::

    CE(z, y[:B]) + kd_weight * T^2 * sum_{b, c} KL(sg softmax(z'/T) || softmax(z/T)) / B

(``KLDivLoss(reduction="sum") * T^2 / B`` in the reference: a mean over the B pairs), T = 4,
kd_weight (lambda) = 1. Accuracy is counted on the first half only (``StepOutput.labels``). In eval
mode the method is the plain backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teskd.config import MethodParams
from teskd.losses import soft_kl
from teskd.errors import TeskdError
from teskd.methods.base import Method, StepOutput, register_method


@dataclass
class CskdParams(MethodParams):
    name: str = "cskd"
    temperature: float = 4.0
    kd_weight: float = 1.0  # lambda

    def validate(self) -> None:
        self.require(positive=["temperature"], non_negative=["kd_weight"])


def split_pairs(images: torch.Tensor, labels: torch.Tensor) -> int:
    """B for a same-class-paired batch of 2B samples; a clear error for anything else."""
    n = images.shape[0]
    if n % 2 or n == 0 or labels.shape[0] != n:
        raise TeskdError(f"CS-KD needs same-class paired batches (2B samples: B samples, then a same-class "
                         f"partner for each); got {n} images and {labels.shape[0]} labels")
    b = n // 2
    if not torch.equal(labels[:b], labels[b:]):
        raise TeskdError("CS-KD needs same-class paired batches, but the second half's labels differ from the "
                         "first half's (is the loader's same-class pairing on? batch_pairing='same_class')")
    return b


@register_method
class CSKD(Method):
    name = "cskd"
    params_class = CskdParams
    batch_pairing = "same_class"

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutput:
        b = split_pairs(images, labels)
        logits = self.backbone(images[:b])
        with torch.no_grad():
            partner = self.backbone(images[b:])
        ce = F.cross_entropy(logits.float(), labels[:b])
        kd = self.params.kd_weight * soft_kl(logits, partner, self.params.temperature)
        return StepOutput(loss=ce + kd, parts={"ce": ce.detach(), "kd": kd.detach()}, logits={"deployed": logits},
                          labels=labels[:b])

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"deployed": self.backbone(images)}
