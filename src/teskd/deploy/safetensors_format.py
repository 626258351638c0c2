"""The deployed network as safetensors: its state dict plus :class:`DeployInfo` in the header.

Reading never runs code (safetensors holds tensors and strings only), so a file from anyone is safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from teskd import fileio
from teskd.deploy.metadata import DeployInfo
from teskd.errors import TeskdError


def save_safetensors(module: torch.nn.Module, info: DeployInfo, path: Path) -> Path:
    """Write ``module``'s weights with ``info`` to ``path`` atomically (a kill leaves the old file or none)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fileio.fault_point("write", tmp)
        save_file(state, str(tmp), metadata=info.to_metadata())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fileio.replace(tmp, path)
    except Exception as exc:  # safetensors reports a full disk as its own error types, not OSError
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {fileio.describe_os_error(exc, path)}") from exc
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], DeployInfo]:
    """The weights and the validated metadata of a teskd safetensors export."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TeskdError(f"no such weights file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise TeskdError(f"cannot read {path}: not a valid safetensors file ({detail[:200]})") from exc
    return weights, DeployInfo.from_metadata(meta, str(path))


def export_teacher(method, path: Path, cfg, num_classes: int, classes=None) -> Path:
    """A run's ``teacher.safetensors``: ``method.deploy_module`` only (no students, no training state)."""
    return save_safetensors(method.deploy_module, DeployInfo.from_config(cfg, num_classes, classes), path)
