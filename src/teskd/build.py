"""From a config to the model that trains: backbone + method (no data, no training loop needed)."""

from __future__ import annotations

import sys

from teskd.config import Config
from teskd.errors import TeskdError
from teskd.data.pipeline import input_size
from teskd.methods import Method, build_method
from teskd.models import build_backbone
from teskd.models.pretrained import load_pretrained


def build_model(cfg: Config, num_classes: int, pretrained: bool = False) -> Method:
    """The method module of ``cfg`` (backbone inside), sized for ``cfg.data.dataset``'s images.

    ``pretrained``: start the backbone from ``model.pretrained`` (training does; evaluation and
    inspection load their weights from a checkpoint, so they do not read that file).
    """
    backbone = build_backbone(cfg.model.arch, num_classes, cfg.model.width_mult)
    if pretrained and cfg.model.pretrained and next(backbone.parameters()).device.type != "meta":
        skipped = load_pretrained(backbone, cfg.model.pretrained)
        if skipped:
            print(f"model.pretrained: {len(skipped)} head tensor(s) of another shape keep their fresh "
                  f"initialisation ({', '.join(skipped)})", file=sys.stderr)
    size = input_size(cfg.data)
    try:
        return build_method(cfg.method.name, backbone, num_classes, cfg.method, size)
    except ValueError as exc:  # e.g. students that cannot be built for such small feature maps
        raise TeskdError(f"cannot build {cfg.method.name} on {cfg.model.arch} for {size}px images: {exc}") from exc
