"""Distillation losses, written out so they can be checked against hand computation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float,
          eps: float = 1e-7) -> torch.Tensor:
    """``T^2 * KL(softmax(z_target/T) + eps || softmax(z/T))``, summed over classes, averaged over the batch.

    The official TESKD form, with the teacher as the target: the ``+eps`` is added to the
    target's probabilities (not renormalised), and the target is *not* detached (callers
    detach it to stop that), so the official KL also pulls the teacher toward its students.
    """
    t = temperature
    log_q = F.log_softmax(logits.float() / t, dim=1)
    p = F.softmax(target_logits.float() / t, dim=1) + eps
    kl = (p * (p.log() - log_q)).sum(dim=1).mean()
    return kl * (t * t)


def soft_kl(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(sg softmax(z_target/T) || softmax(z/T))``, summed over classes, averaged over the batch.

    The distillation term of Hinton's KD, CS-KD, DML (T = 1) and FRSKD: the target is a constant (detached)
    and its probabilities are exact (no ``eps``; ``kd_kl`` is TESKD's official form, which differs in both).
    """
    t = temperature
    log_q = F.log_softmax(logits.float() / t, dim=1)
    log_p = F.log_softmax(target_logits.detach().float() / t, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * (t * t)


def masked_feature_l2(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Sum over batch and channels of ``(f_s - sg(f_t))^2`` where ``f_s > 0 or f_t > 0``.

    A sum, not a mean, as in the official code (its weight, 1e-7, assumes that).
    """
    f_s = student_feature.float().flatten(1)
    f_t = teacher_feature.detach().float().flatten(1)
    mask = ((f_s > 0) | (f_t > 0)).to(f_s.dtype)
    return ((f_s - f_t).pow(2) * mask).sum()


def sigmoid_ramp(epoch: int | float, ramp_epochs: int | float) -> float:
    """``exp(-5 (1 - min(epoch, R)/R)^2)`` at the 0-based ``epoch`` (R = ``ramp_epochs``; 1.0 when R <= 0).

    Laine & Aila's sigmoid-shaped ramp-up of a distillation weight. ONE (``utils/ramps.py``) and OKDDip
    (``train_GL.py``) evaluate it once per epoch, before its first step, at the 0-based epoch, with R = 80:
    exp(-5) ~ 0.0067 in the first epoch, 1 from epoch R on; not per step.
    """
    if ramp_epochs <= 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(ramp_epochs)) / float(ramp_epochs)
    return math.exp(-5.0 * phase * phase)
