"""Architecture name -> ``factory(num_classes, width_mult) -> Backbone``, registered with
``@register_backbone("name")`` in each backbone family's file (or in your code, for your own
network: see ``wrap_backbone``). Names "tv:NAME" and "timm:NAME" are library networks
(``library_models.py``) and need no registration."""

from __future__ import annotations

from teskd.models.backbones.base import Backbone
from teskd.registry import Registry

LIBRARY_NAMES = ", or tv:NAME / timm:NAME for torchvision/timm models"  # ends the list of known architectures

BACKBONES: Registry = Registry("architecture", "teskd.models", more=LIBRARY_NAMES)
register_backbone = BACKBONES.register


def list_backbones() -> list[str]:
    return BACKBONES.names()


def is_known_arch(arch: str) -> bool:
    """Registered, or a library network name (whose existence is checked when it is built)."""
    from teskd.models.library_models import is_library_arch

    return is_library_arch(arch) or arch in BACKBONES


def build_backbone(arch: str, num_classes: int, width_mult: float = 1.0) -> Backbone:
    """The backbone ``arch`` with a ``num_classes``-way head (the config has validated the numbers)."""
    from teskd.models.library_models import is_library_arch, library_backbone

    if is_library_arch(arch):
        backbone = library_backbone(arch, num_classes, width_mult)
    else:
        backbone = BACKBONES.get(arch)(num_classes, float(width_mult))
    backbone.arch, backbone.width_mult = arch, float(width_mult)  # declared by Backbone: what built it
    return backbone
