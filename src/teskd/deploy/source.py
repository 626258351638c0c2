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
    partial: str | None = None  # a mid-epoch checkpoint: where its weights come from (checkpoint.describe_weights)


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
        problem = not_a_model(target)  # an image or a text file is named as such, not as a corrupt checkpoint
        if problem is not None:
            raise NotAModel(problem)
        return target
    from teskd.engine.checkpoint import previous_path

    path = target / "checkpoints" / f"{which}.pt"
    if not path.is_file() and not previous_path(path).is_file():  # mid-save, last.pt may exist as last.prev.pt
        raise _missing_checkpoint(target, which)
    return path


def _missing_checkpoint(target: Path, which: str) -> TeskdError:
    """The error for a folder ``target`` without a ``which`` checkpoint: a run folder is told what it has instead
    (not asked whether it is one), any other folder that it is no run."""
    from teskd.engine.checkpoint import previous_path
    from teskd.engine.rundir import RunDir

    run = RunDir(target)
    deployed = run.deployed_file()
    also = f"; its deployed weights alone: {deployed}" if deployed is not None else ""
    if not run.config.is_file() and not run.checkpoints.is_dir() and deployed is None:
        return NotAModel(f"{target} is not a teskd run directory (it has no {run.config.name} or "
                         f"checkpoints/{_folder_contents(target)})")
    has_last = run.last.is_file() or previous_path(run.last).is_file()
    if which == "best" and has_last:
        # best.pt is published when an evaluated epoch improves: a run stopped inside its first epoch (or before
        # its first evaluation, train.eval_every) has none yet
        return TeskdError(f"{target} has no best checkpoint yet (checkpoints/best.pt is written once an evaluated "
                          f"epoch improves); it has checkpoints/last.pt: use the last checkpoint{also}")
    if deployed is not None:  # a finished run shipped without its checkpoints
        return TeskdError(f"{target} has no checkpoints/{which}.pt{also}")
    return TeskdError(f"{target} has no checkpoint yet (it stopped, or is still, before its first save)")


def _folder_contents(folder: Path) -> str:
    """``: it holds images`` for a folder of images (a likely mix-up with the images argument), else empty."""
    from teskd.data.decode import IMAGE_SUFFIXES

    def some(path: Path, n: int) -> list[Path]:  # a look at a few entries, never a walk of a huge tree
        try:
            return [e for _, e in zip(range(n), path.iterdir())]
        except OSError:
            return []

    entries = some(folder, 200)
    entries += [e for sub in entries[:20] if sub.is_dir() and not sub.is_symlink() for e in some(sub, 20)]
    return ": it holds images" if any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in entries) else ""


# How a file is recognised before it is read as a checkpoint: torch.save writes a zip archive (older torch a
# pickle stream); checkpoint suffixes are loaded whatever their content, so a damaged one is called damaged.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
# Besides the images teskd decodes (data.decode.image_format), files a user may pass by mistake:
_FILE_KINDS = ((b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
               (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"))


def model_kinds() -> str:
    """What a model argument may be: a run folder, a .pt checkpoint, or an export of a format teskd reads."""
    from teskd.deploy.formats import FORMATS, get_format

    suffixes = sorted((get_format(n).suffix for n in FORMATS.names() if get_format(n).load is not None),
                      key=lambda s: s != ".safetensors")  # the run's own export first
    return f"a run folder, .pt, {', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else \
        f"a run folder, .pt or {''.join(suffixes)}"


def not_a_model(target: Path) -> str | None:
    """``"X is not a model file (a PNG image?)"`` when ``target`` is a regular file that cannot be a checkpoint
    (unknown suffix and neither zip nor pickle content), else None. Only 16 bytes of a regular file are read (a
    FIFO or device is left to the loaders, which refuse it by name)."""
    if not target.is_file() or target.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return None
    try:
        with open(target, "rb") as f:
            head = f.read(16)
    except OSError:
        return None  # the loader names the reason
    if head.startswith(_CHECKPOINT_MAGIC):
        return None
    from teskd.data.decode import image_format

    image = image_format(head)
    kind = f"a {image} image" if image else next((k for magic, k in _FILE_KINDS if head.startswith(magic)), None)
    if kind is None and not head:
        kind = "an empty file"
    if kind is None and b"\x00" not in head:
        text = head.decode("utf-8", errors="ignore")  # the 16th byte may cut a character in two
        kind = "a text file" if text and all(c.isprintable() or c.isspace() for c in text) else None
    return f"{target} is not a model file" + (f" ({kind}?)" if kind else "")


class NotAModel(TeskdError):
    """A model argument that is no model (an image, a text file, a folder that is no run): ``what`` says so, the
    message adds what a model may be; ``teskd predict`` replaces that with its usage (arguments swapped?)."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"{what}; a model is {model_kinds()}")


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
    from teskd.engine.checkpoint import describe_weights

    return Deployed(model, info, path, "checkpoint", state.get("epoch"), partial=describe_weights(state))


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
