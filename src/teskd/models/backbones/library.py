"""Any CNN as a teskd backbone, unmodified: a torchvision or timm model, or your own ``nn.Module``.

``LibraryBackbone(model, taps)`` adopts the model's child modules (and any parameters or
buffers it holds itself) as its own, under the same names, and keeps the model object to
run its forward. So:

- its state dict *is* the model's (same keys, same tensors), and loads with ``strict=True``
  into a fresh model from the library's own constructor;
- ``forward(x)`` is ``model(x)``: the deployed network computes exactly what the library's does;
- ``forward_features(x)`` runs that same single pass while hooks read the four stage maps
  (``taps``: from ``stage_probe.probe_stages`` or the library's feature info). The teacher's
  pooled feature is the global average of T4 (for ResNets exactly the head's input).

The network cannot be cut into stem / stages / head modules (``splittable`` is False), so
methods that copy stage 4 (ONE, OKDDip) refuse it; every other method works. TESKD's
students default to the deepest one alone, at the faithful width (``default_student_levels``,
``default_student_width``; any explicit ``method.levels`` / ``method.student_width`` wins).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.errors import TeskdError
from teskd.models.backbones.base import Backbone, Features, StageInfo
from teskd.models.stage_probe import StageTap, probe_stages


class LibraryBackbone(Backbone):
    splittable = False
    # TESKD's defaults here (benchmarks/RESULTS.md, "Student cost vs gain"): the deepest student alone at the
    # faithful width C, the best of the cheaper configurations measured on both networks. Three students at
    # width C would dwarf a mobile network (7x its parameters on MobileNetV3-Small); narrower students
    # (width "stage") are cheaper still but cost the teacher more accuracy
    default_student_levels = (3,)
    default_student_width = "faithful"

    def __init__(self, model: nn.Module, taps: Sequence[StageTap] | None = None, what: str | None = None):
        super().__init__()
        what = what or type(model).__name__
        taps = tuple(taps) if taps is not None else probe_stages(model, what)
        if len(taps) != 4:
            raise TeskdError(f"{what}: a backbone needs 4 stage taps, got {len(taps)}")
        for name, child in model.named_children():
            self.add_module(name, child)
        # tensors the model holds itself (rare in CNNs): the same objects, re-linked after .to()/.half()
        self._own_params = [n for n, p in model._parameters.items() if p is not None]
        self._own_buffers = [n for n, b in model._buffers.items() if b is not None]
        for name in self._own_params:
            self.register_parameter(name, model._parameters[name])
        for name in self._own_buffers:
            self.register_buffer(name, model._buffers[name], persistent=name not in model._non_persistent_buffers_set)
        object.__setattr__(self, "_net", model)  # not registered: its modules are this module's children
        # the model's state-dict layout version, so the state dict's version table is the library's too
        # (torchvision's MNASNet refuses, or converts to an old layout, a state dict of another version)
        self._version = getattr(model, "_version", 1)
        self._what, self._taps = what, taps
        self.stage_info = tuple(StageInfo(t.channels, t.reduction, t.module) for t in taps)
        self.num_features = taps[-1].channels
        self._captured: list | None = None
        for index, tap in enumerate(taps):
            try:
                module = model.get_submodule(tap.module)
            except AttributeError as exc:
                raise TeskdError(f"{what} has no submodule {tap.module!r} to read stage {index + 1} from") from exc
            if tap.where == "input":
                module.register_forward_pre_hook(functools.partial(LibraryBackbone._keep_input, self, index))
            else:
                module.register_forward_hook(functools.partial(LibraryBackbone._keep_output, self, index))
        self.train(model.training)

    @property
    def taps(self) -> tuple[StageTap, ...]:
        """Where each stage map is read (module name, its input or output, channels, reduction)."""
        return self._taps

    @property
    def network(self) -> nn.Module:
        """The wrapped library model (it shares every module and tensor with this backbone)."""
        return self._net

    def _keep(self, index: int, value) -> None:
        if self._captured is not None and self._captured[index] is None and isinstance(value, torch.Tensor):
            self._captured[index] = value

    def _keep_input(self, index: int, module: nn.Module, args: tuple) -> None:
        if args:
            self._keep(index, args[0])

    def _keep_output(self, index: int, module: nn.Module, args: tuple, output) -> None:
        self._keep(index, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._net(x)

    def forward_features(self, x: torch.Tensor) -> Features:
        self._captured = [None] * 4
        try:
            logits = self._net(x)
            stages = self._captured
        finally:
            self._captured = None
        if not isinstance(logits, torch.Tensor):
            raise TeskdError(f"{self._what} returned {type(logits).__name__}, not a logits tensor "
                             f"(build it without auxiliary outputs)")
        if any(s is None for s in stages):
            missing = [i + 1 for i, s in enumerate(stages) if s is None]
            raise TeskdError(f"{self._what}: stage(s) {missing} were not seen in the forward pass "
                             f"(taps {[t.module for t in self._taps]})")
        feature = torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1)
        return Features(stages, logits, feature)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x).stages

    def forward_head(self, t4: torch.Tensor):
        raise TeskdError(f"{self._what} runs as one library network: its head cannot be run on its own "
                         f"(use forward_features)")

    def train(self, mode: bool = True) -> "LibraryBackbone":
        super().train(mode)
        self._net.training = mode  # the model's own forward may read it (e.g. timm's head dropout)
        return self

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        for name in self._own_params:  # .to() may have replaced the tensors: the model sees the new ones
            self._net._parameters[name] = self._parameters[name]
        for name in self._own_buffers:
            self._net._buffers[name] = self._buffers[name]
        return out


def wrap_backbone(model: nn.Module, what: str | None = None) -> LibraryBackbone:
    """Your own CNN (any ``nn.Module`` mapping images to logits) as a teskd backbone; its four
    stages are found by ``stage_probe.probe_stages``."""
    return LibraryBackbone(model, what=what)
