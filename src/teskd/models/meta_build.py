"""Building a network on the meta device: shapes and dtypes without memory, for checking a file's weights
against the network its metadata claims before anything of that size exists."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors  # private: the factories that torch.device(...) redirects

# Constructors some networks compute their layout with at build time (RegNet's stage widths, Swin's relative
# position tables): small, and their values are needed, so they run on the CPU. Every other tensor is meta.
_LAYOUT_FACTORIES = {torch.arange, torch.tensor, torch.linspace, torch.logspace, torch.as_tensor}


class _MetaExceptLayout(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _LAYOUT_FACTORIES:
            kwargs.setdefault("device", torch.device("cpu"))
        elif func in _device_constructors():  # even where the code asks for a real device
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def build_on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters and buffers on the meta device (no memory is allocated for them)."""
    with torch.device("meta"), _MetaExceptLayout():
        return build()


def on_meta() -> bool:
    """Whether the caller is building on the meta device (inside :func:`build_on_meta` or ``torch.device("meta")``)."""
    return torch.get_default_device().type == "meta"
