"""``model.arch=tv:NAME`` (any torchvision classification model) and ``timm:NAME`` (any timm CNN).

The network is the library's own, built without weights (nothing is downloaded; see
``model.pretrained`` for a local weights file) and wrapped by ``LibraryBackbone``. Stages
come from timm's ``feature_info`` when the model has one, else from the shape probe.
``model.width_mult`` must be 1.0: the library's constructor defines the widths.
"""

from __future__ import annotations

import torch
from torch import nn

from teskd.models.meta_build import build_on_meta, on_meta
from teskd.errors import TeskdError
from teskd.models.backbones.library import LibraryBackbone
from teskd.models.stage_probe import StageTap

PREFIXES = {"tv": "torchvision", "timm": "timm"}


def is_library_arch(arch: str) -> bool:
    return isinstance(arch, str) and arch.split(":", 1)[0] in PREFIXES and ":" in arch


def check_library_arch(arch: str) -> None:
    """Raise unless the library of ``arch`` ("tv:NAME" or "timm:NAME") is installed and has the model NAME: asked
    when a run is assembled, before its data is read (a misspelt name was found only after loading it)."""
    prefix, name = arch.split(":", 1)
    if prefix == "tv":
        import torchvision.models as tvm

        known = tvm.list_models(module=tvm)  # classification models only (not detection, video, ...)
        if name not in known:
            close = [k for k in known if name.lower()[:4] in k][:8]
            raise TeskdError(f"unknown torchvision classification model {name!r}"
                             + (f"; similar: {', '.join(close)}" if close else "")
                             + "; all: torchvision.models.list_models(module=torchvision.models)")
    else:
        from teskd.deploy.extras import require

        timm = require("timm", f"model.arch=timm:{name}", "timm")
        if not timm.is_model(name):
            raise TeskdError(f"unknown timm model {name!r}; list them with timm.list_models()")


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    check_library_arch(f"tv:{name}")
    return tvm.get_model(name, weights=None, num_classes=num_classes)


def _timm_model(name: str, num_classes: int) -> nn.Module:
    check_library_arch(f"timm:{name}")  # first: a missing timm is named with its install command
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def timm_taps(model: nn.Module) -> tuple[StageTap, ...] | None:
    """The deepest four stages of timm's ``feature_info`` (module outputs), or None if it has none."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(f, dict) for f in info):
        return None
    by_reduction: dict[int, dict] = {}
    for entry in info:  # one entry per reduction: the last (deepest) one
        by_reduction[int(entry["reduction"])] = entry
    deepest = [by_reduction[r] for r in sorted(by_reduction)][-4:]
    if len(deepest) < 4:
        return None
    names = {n for n, _ in model.named_modules()}
    if any(e["module"] not in names for e in deepest):
        return None
    return tuple(StageTap(e["module"], "output", int(e["num_chs"]), int(e["reduction"])) for e in deepest)


def build_library_model(arch: str, num_classes: int) -> nn.Module:
    """The unmodified library network ``arch`` ("tv:NAME" or "timm:NAME") with a ``num_classes`` head."""
    prefix, name = arch.split(":", 1)
    build = _torchvision_model if prefix == "tv" else _timm_model
    if on_meta():  # some constructors compute their layout with tensors (RegNet's widths): that part on the CPU
        return build_on_meta(lambda: build(name, num_classes))
    return build(name, num_classes)


def library_backbone(arch: str, num_classes: int, width_mult: float = 1.0) -> LibraryBackbone:
    if float(width_mult) != 1.0:
        raise TeskdError(f"model.width_mult must be 1.0 for {arch} (the library's constructor sets the widths), "
                         f"got {width_mult:g}")
    model = build_library_model(arch, num_classes)
    taps = timm_taps(model) if arch.startswith("timm:") else None
    return LibraryBackbone(model, taps, what=arch)
