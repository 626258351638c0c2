"""Import weights trained with the official TESKD code (github zhengli427/TESKD, ``classification/``).

The official models hold the backbone and the students side by side in one module; this project keeps
their module names, so the mapping is a split by name: the modules in STUDENT_MODULES go to
``students.<same>``, everything else to ``backbone.<same>``. ``downsample1``/``fc_b1`` belong to the
shallowest student, ``student1`` here (``b3`` in the official logs). A ``module.`` prefix (DataParallel)
and a ``{"state_dict"|"model"|"net": ...}`` wrapper are accepted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from teskd.config import _clip, _short_key
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
    """The first sentence of torch.load's error; None where it advises ``weights_only=False`` (which runs
    any code the file holds: never advise it for a downloaded file)."""
    text = " ".join(str(exc).split())
    if not text or "weights_only" in text or "weights only" in text.lower():
        return None
    return f"{type(exc).__name__}: {_clip(text.split('. ', 1)[0].rstrip('.'), 160)}"


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
            official = {map_official_key(k): k for k in state}
            parts.append(f"{len(unexpected)} keys have no place here (e.g. {official[unexpected[0]]})")
        if missing:
            parts.append(f"{len(missing)} weights are missing from the file (e.g. {missing[0]})")
        raise TeskdError("the file does not match the official model of this architecture: " + "; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise TeskdError(f"shape mismatch for {key}: file {tuple(value.shape)}, model {tuple(target[key].shape)}")
    return {k: v.to(target[k].dtype) for k, v in mapped.items()}


def check_arch(arch: str) -> None:
    from teskd.models import list_backbones

    known = list_backbones()
    if arch not in known:
        raise TeskdError(f"unknown architecture {_short_key(arch)!r}; known: {', '.join(known)}")


def _is_run_dir_out(out: Path) -> bool:
    return out.suffix not in (".pt", ".safetensors")


def check_out(out: Path) -> None:
    """Refuse to replace anything: an existing file or link, or a non-empty run directory."""
    if _is_run_dir_out(out) and out.is_dir():
        if any(out.iterdir()):
            raise TeskdError(f"{out} already exists and is not empty; choose a new run directory")
    elif out.exists() or out.is_symlink():
        raise TeskdError(f"--out {out} already exists; choose a new path")


def import_official(path: Path, arch: str, out: Path, overrides=()) -> Path:
    """Convert an official state dict into a new run directory, ``.pt`` checkpoint or deployed ``.safetensors``."""
    from teskd.version import __version__
    from teskd.build import assemble_model
    from teskd.config import load_config, resolve_data_root, save_config, to_dict
    from teskd.data.registry import get_dataset_spec
    from teskd.engine.checkpoint import save_checkpoint
    from teskd.deploy.safetensors_format import export_deployed
    from teskd.engine.rundir import RunDir

    check_arch(arch)  # first: no other message makes sense for an architecture that does not exist
    out = Path(out)
    check_out(out)  # before the (slow) reading and converting
    state = read_official(path)
    num_classes = infer_num_classes(state)
    cfg = load_config(None, [f"model.arch={arch}", "method.name=teskd", *overrides])
    if cfg.model.arch != arch:
        raise TeskdError(f"--arch {arch} and the override model.arch={_short_key(cfg.model.arch)} disagree; give "
                         f"the architecture with --arch only")
    cfg.data.root = str(resolve_data_root(cfg.data))  # stored absolute, as the trainer does for its runs
    dataset_classes = get_dataset_spec(cfg.data.dataset).num_classes
    if dataset_classes is not None and dataset_classes != num_classes:
        raise TeskdError(f"{path} has {num_classes}-way heads but data.dataset={cfg.data.dataset} has "
                         f"{dataset_classes} classes; set data.dataset")
    method, _ = assemble_model(cfg, num_classes)
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
        export_deployed(method, out, cfg, num_classes)
    elif out.suffix == ".pt":
        save_checkpoint(checkpoint, out)
    else:
        save_checkpoint(checkpoint, out / "checkpoints" / "last.pt")
        export_deployed(method, RunDir(out).deployed, cfg, num_classes)
    return out
