"""Architecture name -> ``factory(num_classes, width_mult) -> Backbone``, registered with
``@register_backbone("name")`` in each backbone family's file."""

from __future__ import annotations

from teskd.models.backbones.base import Backbone
from teskd.registry import Registry

BACKBONES: Registry = Registry("architecture", "teskd.models")
register_backbone = BACKBONES.register


def list_backbones() -> list[str]:
    return BACKBONES.names()


def build_backbone(arch: str, num_classes: int, width_mult: float = 1.0) -> Backbone:
    """The backbone ``arch`` with a ``num_classes``-way head (the config has validated the numbers)."""
    backbone = BACKBONES.get(arch)(num_classes, float(width_mult))
    backbone.arch, backbone.width_mult = arch, float(width_mult)  # what built it (e.g. for a DML peer)
    return backbone
