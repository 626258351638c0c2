"""The deployed network of anything teskd writes: a run folder, a checkpoint, or an export.

One entry point, :func:`load_deployed`, so ``export``, ``predict``, ``eval`` and :func:`teskd.load`
accept the same things. Nothing loaded here runs code from the file: checkpoints are read with
``weights_only=True``, safetensors hold tensors and strings only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from teskd.deploy.metadata import DeployInfo
from teskd.errors import TeskdError

# every method keeps the network it ships as ``method.backbone`` (see Method.deploy_module)
DEPLOY_PREFIX = "backbone."


def is_export_file(path: Path | str) -> bool:
    """Whether ``path``'s suffix names a format teskd reads (see :mod:`teskd.deploy.formats`)."""
    from teskd.deploy.formats import readable_format

    return readable_format(path) is not None


@dataclass
class Deployed:
    model: nn.Module  # the deployed network in eval mode: images -> logits
    info: DeployInfo
    source: Path  # the file the weights came from
    kind: str  # "checkpoint", or the export format's name ("safetensors", "onnx", "pt2", ...)
    epoch: int | None = None  # a checkpoint's finished epochs
    movable: bool = True  # may run on another device (compiled exports run where they were built: the CPU)


def build_deployed(weights: dict[str, torch.Tensor], info: DeployInfo, what: str) -> nn.Module:
    """The plain backbone of ``info`` with ``weights`` loaded strictly, in eval mode."""
    from teskd.engine.checkpoint import build_with_weights
    from teskd.models import build_backbone

    try:
        backbone = build_with_weights(
            lambda: build_backbone(info.arch, info.num_classes, info.width_mult), weights,
            f"{what} does not match {info.arch} (width_mult {info.width_mult:g}, {info.num_classes} classes)")
    except TeskdError as exc:
        raise TeskdError(exc.args[0] if str(exc).startswith(what) else f"{what}: {exc}") from exc
    return backbone.eval()


def checkpoint_path(target: Path, which: str = "last") -> Path:
    """A run folder's ``checkpoints/<which>.pt``, or ``target`` itself when it is a file."""
    if which not in ("last", "best"):
        raise TeskdError(f"unknown checkpoint {which!r}; expected last or best")
    if not target.is_dir():
        if not target.exists():
            raise TeskdError(f"no such run directory, checkpoint or export: {target}")
        return target
    from teskd.engine.checkpoint import previous_path

    path = target / "checkpoints" / f"{which}.pt"
    if not path.is_file() and not previous_path(path).is_file():  # mid-save, last.pt may exist as last.prev.pt
        hint = (f"; its deployed weights alone: {target / 'teacher.safetensors'}"
                if (target / "teacher.safetensors").is_file() else " (is it a teskd run directory?)")
        raise TeskdError(f"{target} has no checkpoints/{which}.pt{hint}")
    return path


def read_checkpoint(path: Path, attempts: int = 3) -> dict:
    """The newest verified checkpoint of ``path``'s family (``last.pt``, else ``last.prev.pt``). A run that is
    saving while we read renames several files one after another: a read that met that moment is tried again."""
    from teskd.engine.checkpoint import load_latest

    for attempt in range(attempts):
        try:
            return load_latest(path)[0]
        except TeskdError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def from_checkpoint(path: Path) -> Deployed:
    """The deployed network of a teskd checkpoint (only its ``backbone.*`` weights are used, so methods whose
    helpers need other files, such as KD's teacher, load without them)."""
    from teskd.config import from_dict

    state = read_checkpoint(path)
    try:
        cfg = from_dict(state["config"], [])
    except TeskdError as exc:
        raise TeskdError(f"checkpoint {path} has an unusable config ({exc})") from exc
    weights = {k[len(DEPLOY_PREFIX):]: v for k, v in state["model"].items() if k.startswith(DEPLOY_PREFIX)}
    if not weights:
        raise TeskdError(f"checkpoint {path} holds no {DEPLOY_PREFIX}* weights (the deployed network)")
    num_classes = state.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        heads = [v for k, v in weights.items() if k.endswith(".weight") and v.dim() == 2]
        if not heads:
            raise TeskdError(f"checkpoint {path} does not say how many classes its network predicts")
        num_classes = int(heads[-1].shape[0])
    classes = state.get("classes") or None
    if classes is not None and (len(classes) != num_classes or not all(isinstance(c, str) for c in classes)):
        classes = None  # names that do not fit the head are not shown rather than shown wrong
    info = DeployInfo.from_config(cfg, num_classes, classes)
    model = build_deployed(weights, info, f"checkpoint {path}")
    return Deployed(model, info, path, "checkpoint", state.get("epoch"))


def load_deployed(target: Path | str, which: str = "last") -> Deployed:
    """A run folder (its ``checkpoints/<which>.pt``), a ``.pt`` checkpoint, or an export of a format teskd reads
    (``.safetensors``, ``.onnx``, ``.pt2``, or a registered one), chosen by its suffix."""
    from teskd.deploy.formats import readable_format

    target = Path(target).expanduser()
    fmt = readable_format(target)
    if fmt is None:
        return from_checkpoint(checkpoint_path(target, which))
    if not target.exists():  # a FIFO or device is named as such by the reader
        raise TeskdError(f"no such export file: {target}")
    model, info = fmt.load(target)
    return Deployed(model, info, target, fmt.name, movable=fmt.movable)
