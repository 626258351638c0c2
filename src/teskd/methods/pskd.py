"""Progressive self-knowledge distillation (PS-KD; Kim et al., ICCV 2021; lgcnsai/PS-KD-Pytorch).

The network is trained against a soft target mixing the label with its own earlier prediction:

    alpha_t = alpha_T * (epoch + 1) / epochs                  (epoch 0-based; alpha_T = 0.8)
    target  = (1 - alpha_t) * one-hot + alpha_t * P_prev[i]
    loss    = mean over the batch of sum_c -target_c * log_softmax(z)_c

What this follows, read in the official ``main.py``: a table ``all_predictions`` (N x C, float32)
holds one row per training sample; at epoch 0 the batch's rows are set to the one-hot labels before
the target is formed (so the first epoch is plain cross-entropy); after each step the batch's rows
are overwritten with ``softmax(outputs)`` of that step's forward, i.e. the train-mode prediction
computed *before* the optimizer update. Every sample is seen once per epoch, so P_prev[i] is the
sample's prediction from the previous epoch. The official loss is ``(-target * log_probs).mean(0).sum()``,
the same number as the batch mean of per-sample sums used here.

One addition: a row that was never written (all zeros; e.g. a checkpoint without the table) is
read as the one-hot label, as at epoch 0, instead of as zeros; in an ordinary run that never happens.

The table is not part of the module's state dict (evaluation and export never see it); it travels
in checkpoints through :meth:`training_state_dict` / :meth:`load_training_state`, so a resumed run
continues with the same targets. It lives on the device of the logits (20 MB for CIFAR-100; a
float32 table for ImageNet-1k would take 5 GB). With several processes every rank keeps the whole
table: each step's predictions and indices are all-gathered (as the official code does), so every
rank's table is the one a single process would hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from teskd.config import MethodParams
from teskd.engine import distributed
from teskd.errors import TeskdError
from teskd.methods.base import Method, StepOutput, register_method


@dataclass
class PSKDParams(MethodParams):
    name: str = "pskd"
    alpha_T: float = 0.8  # the weight of the previous prediction in the last epoch

    def validate(self) -> None:
        if not 0.0 <= self.alpha_T <= 1.0:
            raise TeskdError(f"method.alpha_T must be in [0, 1], got {self.alpha_T}")


def pskd_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target: ``mean_i sum_c -target_ic * log_softmax(z_i)_c``."""
    return (-target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@register_method
class PSKD(Method):
    name = "pskd"
    params_class = PSKDParams

    def __init__(self, backbone, num_classes: int, params: PSKDParams, input_size: int = 32):
        super().__init__(backbone, num_classes, params, input_size)
        self.predictions: torch.Tensor | None = None  # (N, C) float32; a plain attribute, not a buffer

    # --- hooks -------------------------------------------------------------------------------

    def setup_data(self, num_train_samples: int, world_size: int = 1) -> None:
        self.predictions = torch.zeros(int(num_train_samples), self.num_classes, dtype=torch.float32)

    def training_state_dict(self) -> dict[str, Any]:
        if self.predictions is None:
            return {}
        return {"predictions": self.predictions.detach().to("cpu", copy=True)}

    def load_training_state(self, state: dict[str, Any]) -> None:
        table = state.get("predictions")
        if table is None:
            return  # rows stay zero: read as one-hot labels (see the module docstring)
        if self.predictions is None:
            raise TeskdError("method pskd: load_training_state before setup_data (the trainer must call "
                             "setup_data first)")
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(self.predictions.shape):
            shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise TeskdError(f"the checkpoint's PS-KD prediction table has shape {shape}, but this training set "
                             f"needs {tuple(self.predictions.shape)} (samples x classes)")
        self.predictions = table.detach().to(self.predictions.device, torch.float32, copy=True)

    # --- training ----------------------------------------------------------------------------

    def alpha_t(self) -> float:
        return self.params.alpha_T * (self.epoch + 1) / self.epochs

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      index: torch.Tensor | None = None) -> StepOutput:
        if self.predictions is None:
            raise TeskdError("method pskd needs the training-set size before training: the trainer must call "
                             "setup_data(num_train_samples) first")
        if index is None:
            raise TeskdError("method pskd needs each training sample's dataset index (the batch has none)")
        logits = self.backbone(images)
        if self.predictions.device != logits.device:
            self.predictions = self.predictions.to(logits.device)
        index = index.to(logits.device)
        onehot = F.one_hot(labels, self.num_classes).float()
        if self.epoch == 0:
            prev = onehot
        else:
            prev = self.predictions[index]
            prev = torch.where(prev.sum(dim=1, keepdim=True) > 0, prev, onehot)  # never written: one-hot
        alpha = self.alpha_t()
        target = (1.0 - alpha) * onehot + alpha * prev
        loss = pskd_loss(logits, target)
        with torch.no_grad():  # every rank's rows (the ranks' batches have equal sizes at every step)
            probs = F.softmax(logits.detach().float(), dim=1)
            self.predictions[distributed.all_gather_cat(index)] = distributed.all_gather_cat(probs)
        return StepOutput(loss=loss, parts={"ce": loss.detach()}, logits={"deployed": logits})

    def forward_eval(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"deployed": self.backbone(images)}
