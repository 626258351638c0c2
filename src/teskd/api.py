"""The Python API: teskd from a notebook or a script, without the CLI.

    import teskd
    summary = teskd.train("configs/cifar100/resnet18_teskd.yaml", out="runs/r18", train={"epochs": 2})
    model, preprocess, classes = teskd.load("runs/r18")       # or a checkpoint, .safetensors, .onnx, .pt2
    probs = model(preprocess("cat.png")[None]).softmax(1)
"""

from __future__ import annotations

import json
from pathlib import Path

from teskd.errors import TeskdError


def load(path, checkpoint: str = "last"):
    """``(model, preprocess, class_names)`` of a run folder (its ``checkpoints/<checkpoint>.pt``), a checkpoint,
    or an export (``.safetensors``, ``.onnx``, ``.pt2``). ``model``: images -> logits, in eval mode on the CPU;
    ``preprocess``: a path, PIL image or uint8 (3, H, W) tensor -> the normalised (3, S, S) input;
    ``class_names``: in label order (None if the run did not know them)."""
    from teskd.deploy.preprocess import Preprocess
    from teskd.deploy.source import load_deployed

    deployed = load_deployed(path, checkpoint)
    classes = list(deployed.info.classes) if deployed.info.classes else None
    return deployed.model, Preprocess(deployed.info), classes


def _as_overrides(settings: dict) -> list[str]:
    """The CLI's ``key=value`` syntax: the value is read as YAML (JSON is YAML)."""
    from teskd.config import dotted

    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in dotted(settings).items()]


def train(config=None, out=None, *, resume: bool = False, overwrite: bool = False, overrides=(), **settings) -> dict:
    """Train and return the run's summary (``run_dir`` included), as ``teskd train`` does.

    ``config``: a YAML path, a :class:`teskd.config.Config`, a dict of settings, or None (the defaults).
    Settings override it as keyword sections (``train={"epochs": 2}``), dotted keys
    (``**{"train.epochs": 2}``) or CLI strings (``overrides=["train.epochs=2"]``).
    """
    from teskd.engine import distributed
    from teskd.launch import train_run
    from teskd.spelling import API

    if isinstance(overrides, str):
        raise TeskdError("overrides is a list of 'key=value' strings, not one string")
    started = distributed.init_from_env()  # under torchrun: join its process group
    try:
        return train_run(config, [*_as_overrides(settings), *overrides], out=Path(out) if out is not None else None,
                         resume=resume, overwrite=overwrite, spelling=API)
    finally:
        if started:
            distributed.shutdown()


def export(target, format: str = "safetensors", out=None, checkpoint: str = "last", **options) -> dict:  # noqa: A002
    """``teskd export``: write the deployed network as ``format`` and verify it; returns what was written."""
    from teskd.deploy.export import export as run_export
    from teskd.spelling import API

    return run_export(target, format, out, which=checkpoint, spelling=API, **options)


def predict(path, images, topk: int = 5, checkpoint: str = "last") -> list[dict]:
    """Top-``topk`` ``{"label", "class", "prob"}`` per image file (folders searched); unreadable files raise."""
    from teskd.deploy.source import load_deployed
    from teskd.deploy.predict import predict as run_predict

    result = run_predict(load_deployed(path, checkpoint), [images] if isinstance(images, (str, Path)) else images,
                         topk=topk, progress=False)
    if result.skipped:
        path, why = result.skipped[0]
        raise TeskdError(f"cannot read image {path}: {why}")
    return result.results
