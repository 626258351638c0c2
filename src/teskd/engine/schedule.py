"""Learning-rate schedule as a pure function of training progress (so resume needs no state)."""

from __future__ import annotations

import math

from teskd.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, epochs: int, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Multiplier of the base lr for ``step`` (0-based) of ``epoch`` (0-based).

    Outside warm-up the factor is constant within an epoch, matching the
    official per-epoch ``MultiStepLR``/``CosineAnnealingLR`` stepping: with
    milestones [100, 150], 0-based epochs 0..99 use lr, 100..149 lr*gamma.
    Warm-up ramps linearly per step over the first ``warmup_epochs``.
    """
    if cfg.name == "step":
        factor = cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    else:  # cosine
        factor = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if epoch < cfg.warmup_epochs:
        progress = (epoch * steps_per_epoch + step + 1) / (cfg.warmup_epochs * steps_per_epoch)
        factor *= min(1.0, progress)
    return factor
