"""Evaluate a saved run or checkpoint; describe a configured model's size and cost."""

from __future__ import annotations

from pathlib import Path

import torch

from teskd.config import Config, from_dict
from teskd.engine import runtime
from teskd.engine.checkpoint import load_checkpoint, load_model_weights
from teskd.engine.evaluate import evaluate
from teskd.errors import TeskdError


def _resolve_checkpoint(target: Path, which: str) -> Path:
    if target.is_dir():
        path = target / "checkpoints" / f"{which}.pt"
        if not path.is_file():
            raise TeskdError(f"{target} has no checkpoints/{which}.pt (is it a teskd run directory?)")
        return path
    if not target.exists():
        raise TeskdError(f"no such run directory or checkpoint: {target}")
    return target


def evaluate_checkpoint(target: Path, overrides=(), which: str = "last", split: str = "test") -> dict:
    from teskd.data.pipeline import build_data
    from teskd.engine.trainer import build_model

    path = _resolve_checkpoint(Path(target), which)
    state = load_checkpoint(path)
    cfg: Config = from_dict(state["config"], overrides)
    device = runtime.resolve_device(cfg.train.device)
    bundle = build_data(cfg.data, device, cfg.train.seed)
    if bundle.num_classes != state["num_classes"]:
        raise TeskdError(f"checkpoint {path} was trained for {state['num_classes']} classes, "
                         f"but {cfg.data.dataset} has {bundle.num_classes}")
    method = build_model(cfg, bundle.num_classes)
    load_model_weights(method, state["model"], f"checkpoint {path} does not match {cfg.model.arch}/{cfg.method.name}")
    runtime.prepare_model(method, cfg.train, device)
    loader = bundle.test if split == "test" else bundle.val
    if loader is None:
        raise TeskdError("this run has no validation split (data.val_per_class=0); use --split test")
    acc = evaluate(method, loader, device, runtime.resolve_amp(cfg.train.amp, device),
                   channels_last=cfg.train.channels_last, progress=cfg.train.progress, desc=split)
    return {"checkpoint": str(path), "epoch": state["epoch"], "split": split,
            "images": int(loader.labels.shape[0]), "accuracy": acc}


def model_info(cfg: Config) -> dict:
    """Parameters and multiply-adds per image, for training (all branches) and deployment."""
    from teskd.data.registry import get_dataset_spec
    from teskd.engine.trainer import build_model
    from teskd.models import count_macs, count_params
    from teskd.models.complexity import executed_macs

    spec = get_dataset_spec(cfg.data.dataset)
    with torch.device("meta"):  # shapes only: no memory, no compute, instant even for 435M parameters
        method = build_model(cfg, spec.num_classes)
    shape = (1, 3, spec.image_size, spec.image_size)
    forward = lambda m, x: m.forward_eval(x)  # noqa: E731  (all branches)
    info = {
        "arch": cfg.model.arch,
        "method": cfg.method.name,
        "num_classes": spec.num_classes,
        "params_train": count_params(method),
        "params_deploy": count_params(method.deploy_module),
        "macs_train": count_macs(method, shape, forward=forward),
        "macs_deploy": count_macs(method.deploy_module, shape),
    }
    executed = executed_macs(method, shape, forward=forward)
    if executed != info["macs_train"]:
        info["macs_train_executed"] = executed  # after the exact rewrites of the fast students
    return info
