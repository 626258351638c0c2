"""Import weights trained with the official TESKD code (github zhengli427/TESKD, ``classification/``).

The official models are one module holding the backbone and the students side by
side. This project keeps the official module names inside each part, so the
mapping is a split by name::

    official key                                   this project's key
    <backbone module>.*  (conv1, bn1, layer1..4, fc;        backbone.<same>
      SE-ResNet: pre, stage1..4, linear;
      VGG: conv1, bn1, conv2, bn2, layer1..4, classifier)
    laterals.{0..3}.*, upsample.{0..2}.*,                   students.<same>
    fuse_{1,2,3}.*, downsample{1,2,3}.*, fc_b{1,2,3}.*

``downsample1``/``fc_b1`` belong to the shallowest (T1-level) student, which this
project calls ``student1`` (the official logs call it ``b3``: their names are swapped).
A ``module.`` prefix (DataParallel/DDP) and a ``{"state_dict": ...}`` or
``{"model": ...}`` wrapper are accepted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from teskd.errors import TeskdError

STUDENT_MODULES = ("laterals", "upsample", "fuse_1", "fuse_2", "fuse_3", "downsample1", "downsample2",
                   "downsample3", "fc_b1", "fc_b2", "fc_b3")


def _unwrap(obj) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeskdError("the file does not hold a state dict (a mapping of names to tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def map_official_key(key: str) -> str:
    """Official key -> this project's key in the TESKD method's state dict."""
    return f"students.{key}" if key.split(".", 1)[0] in STUDENT_MODULES else f"backbone.{key}"


def _load_failure_reason(exc: BaseException) -> str | None:
    """The first sentence of torch.load's error, or None where it is empty or tells to load with
    ``weights_only=False`` (which runs any code the file holds: never advise it for a downloaded file)."""
    text = " ".join(str(exc).split())
    if not text or "weights_only" in text or "weights only" in text.lower():
        return None
    sentence = text.split(". ", 1)[0].rstrip(".")
    if len(sentence) > 160:
        sentence = sentence[:157] + "..."
    return f"{type(exc).__name__}: {sentence}"


def read_official(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise TeskdError(f"official state dict not found: {path}")
    if path.stat().st_size == 0:
        raise TeskdError(f"cannot read {path}: the file is empty")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _load_failure_reason(exc)
        raise TeskdError(f"cannot read {path}: not a PyTorch state dict file, or one that holds objects other "
                         f"than tensors" + (f" ({reason})" if reason else "")) from exc
    try:
        return _unwrap(obj)
    except TeskdError as exc:
        raise TeskdError(f"{path}: {exc}") from exc


def infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    """The class count from the student heads (present in every official TESKD model)."""
    for key in ("fc_b1.bias", "fc_b2.bias", "fc_b3.bias", "fc.bias", "linear.bias", "classifier.4.bias"):
        if key in state:
            return int(state[key].shape[0])
    raise TeskdError("cannot infer the number of classes: no student head (fc_b1..3) or classifier in the file")


def convert(state: dict[str, torch.Tensor], method) -> dict[str, torch.Tensor]:
    """Map official keys onto ``method``'s state dict, checking that every tensor has a place and a shape."""
    target = method.state_dict()
    mapped = {map_official_key(k): v for k, v in state.items()}
    unexpected = sorted(k for k in mapped if k not in target)
    missing = sorted(k for k in target if k not in mapped)
    if unexpected or missing:
        parts = []
        if unexpected:
            inv = {map_official_key(k): k for k in state}
            parts.append(f"{len(unexpected)} keys have no place here (e.g. {inv[unexpected[0]]})")
        if missing:
            parts.append(f"{len(missing)} weights are missing from the file (e.g. {missing[0]})")
        raise TeskdError("the file does not match the official model of this architecture: " + "; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise TeskdError(f"shape mismatch for {key}: file {tuple(value.shape)}, model {tuple(target[key].shape)}")
    return {k: v.to(target[k].dtype) for k, v in mapped.items()}


def _shown(text: str) -> str:
    """A user's string for a message: one line, at most 80 characters."""
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= 80 else text[:77] + "..."


def check_arch(arch: str) -> None:
    from teskd.models import list_backbones

    known = list_backbones()
    if arch not in known:
        raise TeskdError(f"unknown architecture {_shown(arch)!r}; known: {', '.join(known)}")


def _is_run_dir_out(out: Path) -> bool:
    return out.suffix not in (".pt", ".safetensors")


def check_out(out: Path) -> None:
    """Refuse to replace anything: an existing file (whatever its suffix; a dangling link too), an
    existing ``.pt``/``.safetensors`` path of any kind, or a non-empty directory."""
    if _is_run_dir_out(out) and out.is_dir():
        if any(out.iterdir()):
            raise TeskdError(f"{out} already exists and is not empty; choose a new run directory")
    elif out.exists() or out.is_symlink():
        raise TeskdError(f"--out {out} already exists; choose a new path")


def import_official(path: Path, arch: str, out: Path, overrides=()) -> Path:
    """Convert an official state dict; write a run directory, a ``.pt`` checkpoint or a teacher ``.safetensors``.

    Nothing existing is replaced: ``out`` must be a new path (or an empty directory, for a run directory).
    """
    from teskd import __version__
    from teskd.config import load_config, resolve_data_root, save_config, to_dict
    from teskd.engine.checkpoint import save_checkpoint
    from teskd.build import build_model
    from teskd.export import export_teacher

    check_arch(arch)  # first: no other message makes sense for an architecture that does not exist
    out = Path(out)
    check_out(out)  # before the (slow) reading and converting
    state = read_official(path)
    num_classes = infer_num_classes(state)
    cfg = load_config(None, [f"model.arch={arch}", "method.name=teskd", *overrides])
    if cfg.model.arch != arch:
        raise TeskdError(f"--arch {arch} and the override model.arch={_shown(cfg.model.arch)} disagree; give "
                         f"the architecture with --arch only")
    cfg.data.root = str(resolve_data_root(cfg.data))  # stored absolute, as the trainer does for its runs
    from teskd.data.registry import get_dataset_spec

    if get_dataset_spec(cfg.data.dataset).num_classes != num_classes:
        raise TeskdError(f"{path} has {num_classes}-way heads but data.dataset={cfg.data.dataset} has "
                         f"{get_dataset_spec(cfg.data.dataset).num_classes} classes; set data.dataset")
    method = build_model(cfg, num_classes)
    method.load_state_dict(convert(state, method))
    checkpoint = {"model": method.state_dict(), "config": to_dict(cfg), "epoch": 0, "num_classes": num_classes,
                  "imported_from": str(path), "teskd_version": __version__}
    check_out(out)  # again: the conversion took a while
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if _is_run_dir_out(out):
            out.mkdir(exist_ok=True)
            save_config(cfg, out / "config.yaml")
    except OSError as exc:
        raise TeskdError(f"cannot write {out}: {exc.strerror or exc}") from exc
    if out.suffix == ".safetensors":
        export_teacher(method, out, cfg, num_classes)
    elif out.suffix == ".pt":
        save_checkpoint(checkpoint, out)
    else:
        save_checkpoint(checkpoint, out / "checkpoints" / "last.pt")
        export_teacher(method, out / "teacher.safetensors", cfg, num_classes)
    return out
