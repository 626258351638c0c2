"""Helpers shared by the auxiliary-classifier baselines (BYOT, DKS): sizes read from ``stage_info`` only.

The exits are named after the stage they read: ``exit1``..``exit3`` (shallow to deep); the backbone's
own head is the deployed network (BYOT: ``teacher``, which the exits learn from; DKS: ``deployed``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from teskd.errors import TeskdError
from teskd.models.backbones.base import StageInfo


def exit_name(stage: int) -> str:
    return f"exit{stage}"


def stage_ratio(deep: StageInfo, shallow: StageInfo) -> int:
    """reduction(deep) / reduction(shallow): an integer >= 1 for every backbone in the registry."""
    if deep.reduction < shallow.reduction or deep.reduction % shallow.reduction:
        raise TeskdError(f"auxiliary exits need integer stage-reduction ratios, got reductions "
                         f"{shallow.reduction} and {deep.reduction}")
    return deep.reduction // shallow.reduction


def check_stage_size(stage_info: Sequence[StageInfo], stage: int, input_size: int, kernel: int, what: str) -> None:
    """A k x k stride-k convolution on stage ``stage`` (1-based) needs a map of at least k x k pixels."""
    size = input_size // stage_info[stage - 1].reduction
    if size < kernel:
        raise TeskdError(f"{what} reads stage {stage} ({size}x{size} px at input size {input_size}) with a "
                         f"{kernel}x{kernel} convolution; use larger images")


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Global average pool, flattened to (B, C)."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
