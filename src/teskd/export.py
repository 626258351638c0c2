"""Export the deployed network: its state dict as safetensors, with what is needed to rebuild and feed it."""

from __future__ import annotations

import os
from pathlib import Path

from teskd import __version__, fileio
from teskd.config import Config
from teskd.errors import TeskdError


def export_teacher(method, path: Path, cfg: Config, num_classes: int, classes: list[str] | None = None) -> None:
    """Write ``method.deploy_module``'s weights to ``path`` atomically (metadata: arch, classes, width,
    dataset and its normalisation, so the file alone is enough to rebuild and use the network)."""
    from safetensors.torch import save_file

    import json

    from teskd.data.pipeline import input_size
    from teskd.data.registry import get_dataset_spec

    spec = get_dataset_spec(cfg.data.dataset)
    state = {k: v.detach().cpu().contiguous() for k, v in method.deploy_module.state_dict().items()}
    meta = {"arch": cfg.model.arch, "num_classes": str(num_classes), "width_mult": str(cfg.model.width_mult),
            "dataset": cfg.data.dataset, "image_size": str(input_size(cfg.data)),
            "mean": ",".join(map(str, spec.mean)), "std": ",".join(map(str, spec.std)),
            "teskd_version": __version__}
    if classes:
        meta["classes"] = json.dumps(classes)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fileio.fault_point("write", tmp)
        save_file(state, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fileio.replace(tmp, path)
    except Exception as exc:  # safetensors reports a full disk as its own error types, not OSError
        tmp.unlink(missing_ok=True)
        raise TeskdError(f"could not write {path}: {fileio.describe_os_error(exc, path)}") from exc
