"""Backbone registry: architecture name -> constructor.

A backbone file registers each of its architectures with ``@register_backbone("name")``
on a function ``(num_classes: int, width_mult: float) -> Backbone``. Adding a backbone
family means one new file plus one import line in ``teskd/models/__init__.py``.
"""

from __future__ import annotations

from typing import Callable

from teskd.errors import TeskdError
from teskd.models.backbones.base import Backbone

BackboneFactory = Callable[[int, float], Backbone]

_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``factory(num_classes, width_mult) -> Backbone`` under ``name``."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES and _BACKBONES[name] is not factory:
            raise ValueError(f"backbone {name!r} is registered twice")
        _BACKBONES[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_BACKBONES)


def build_backbone(arch: str, num_classes: int, width_mult: float = 1.0) -> Backbone:
    """Build the registered backbone ``arch`` (a user's choice: unknown names are a TeskdError)
    with a ``num_classes``-way head; ``num_classes`` and ``width_mult`` are validated by the caller."""
    if arch not in _BACKBONES:
        known = ", ".join(list_backbones()) or "(none)"
        raise TeskdError(f"unknown architecture {arch!r}; known: {known}")
    return _BACKBONES[arch](num_classes, float(width_mult))
