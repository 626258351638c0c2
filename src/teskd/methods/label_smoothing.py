"""Label smoothing: cross-entropy against ``(1 - eps) * one-hot + eps / C`` (``F.cross_entropy(label_smoothing=eps)``).

The ``ce`` method with the smoothing on by default (eps = 0.1), so that it is a baseline of its own in
sweeps and reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from teskd.methods.base import register_method
from teskd.methods.ce import CE, CEParams


@dataclass
class LabelSmoothingParams(CEParams):
    name: str = "label_smoothing"
    label_smoothing: float = 0.1


@register_method
class LabelSmoothing(CE):
    name = "label_smoothing"
    params_class = LabelSmoothingParams
