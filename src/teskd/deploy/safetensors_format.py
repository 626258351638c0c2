"""The deployed network as safetensors: its state dict plus :class:`DeployInfo` in the header.

Reading never runs code (safetensors holds tensors and strings only), so a file from anyone is safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from teskd import fileio
from teskd.deploy.formats import ExportFormat, register_format
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
        reason = fileio.describe_os_error(exc, path)  # before the removal frees space
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {reason}") from exc
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], DeployInfo]:
    """The weights and the validated metadata of a teskd safetensors export."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    path = Path(path)
    if not path.exists():
        raise TeskdError(f"no such weights file: {path}")
    data = fileio.read_bytes(path, "weights file")  # a regular file of plausible size, read once
    try:
        meta = _header_metadata(data)
        info = DeployInfo.from_metadata(meta, str(path))  # bounds checked before any tensor is made
        weights = load_tensors(data)
    except (SafetensorError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise TeskdError(f"cannot read {path}: not a valid safetensors file ({detail[:200]})") from exc
    return weights, info


MAX_HEADER = 100 << 20  # safetensors' own reader refuses headers over 100 MB


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte little-endian length, then the JSON)."""
    import json

    if len(data) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"header length {size} does not fit the file")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("its __metadata__ is not a JSON object of strings")
    return meta


def export_deployed(method, path: Path, cfg, num_classes: int, classes=None) -> Path:
    """A run's ``deployed.safetensors``: ``method.deploy_module`` only (no students, no training state)."""
    return save_safetensors(method.deploy_module, DeployInfo.from_config(cfg, num_classes, classes), path)


def load_safetensors(path: Path) -> tuple[torch.nn.Module, DeployInfo]:
    """The network of a safetensors export (rebuilt from its metadata, weights loaded strictly) and its info."""
    from teskd.deploy.source import build_deployed

    weights, info = read_safetensors(path)
    return build_deployed(weights, info, str(path)), info


def _write(model: torch.nn.Module, info: DeployInfo, out: Path) -> torch.nn.Module:
    save_safetensors(model, info, out)
    return load_safetensors(out)[0]


register_format(ExportFormat(
    "safetensors", ".safetensors", "weights + metadata; default", _write, load_safetensors, exact=True,
    recognises=lambda path: read_safetensors(path)[1].teskd_version is not None))
