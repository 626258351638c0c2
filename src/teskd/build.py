"""From a config to the model that trains: backbone + method (no data, no training loop needed)."""

from __future__ import annotations

from teskd.config import Config
from teskd.errors import TeskdError
from teskd.data.pipeline import input_size
from teskd.methods import Method, build_method
from teskd.models import build_backbone


def build_model(cfg: Config, num_classes: int) -> Method:
    """The method module of ``cfg`` (backbone inside), sized for ``cfg.data.dataset``'s images."""
    backbone = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    size = input_size(cfg.data)
    try:
        return build_method(cfg.method.name, backbone, num_classes, cfg.method, size)
    except ValueError as exc:  # e.g. students that cannot be built for such small feature maps
        raise TeskdError(f"cannot build {cfg.method.name} on {cfg.model.arch} for {size}px images: {exc}") from exc
