"""Distillation losses, written out so they can be checked against hand computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          eps: float = 1e-7, detach_teacher: bool = False) -> torch.Tensor:
    """``T^2 * KL(softmax(z_t/T) + eps || softmax(z_s/T))``, summed over classes, averaged over the batch.

    This is the official TESKD form: the ``+eps`` is added to the teacher's
    probabilities (not renormalised), and by default the teacher's logits are
    *not* detached, so the KL also pulls the teacher toward its students.
    """
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1) + eps
    kl = (p * (p.log() - log_q)).sum(dim=1).mean()
    return kl * (t * t)


def masked_feature_l2(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Sum over batch and channels of ``(f_s - sg(f_t))^2`` where ``f_s > 0 or f_t > 0``.

    A sum, not a mean, as in the official code (its weight, 1e-7, assumes that).
    """
    f_s = student_feature.float().flatten(1)
    f_t = teacher_feature.detach().float().flatten(1)
    mask = ((f_s > 0) | (f_t > 0)).to(f_s.dtype)
    return ((f_s - f_t).pow(2) * mask).sum()
