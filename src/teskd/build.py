"""From a config to the model that trains: backbone + method (no data, no training loop needed)."""

from __future__ import annotations

from teskd.config import Config
from teskd.data.pipeline import input_size
from teskd.methods import Method, build_method
from teskd.models import build_backbone


def build_model(cfg: Config, num_classes: int) -> Method:
    """The method module of ``cfg`` (backbone inside), sized for ``cfg.data.dataset``'s images."""
    backbone = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    return build_method(cfg.method.name, backbone, num_classes, cfg.method, input_size(cfg.data))
