"""Evaluate a saved run, checkpoint or exported deployed network; describe a configured model's size and cost.

Every evaluation result says exactly what was evaluated: the dataset and split, how many
images, whether that is the whole split or a subset (and which one), and the absolute
data folder that was read. A run directory's ``config.yaml`` names its data folder, so a
run folder from someone else decides what is read: the result shows it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from teskd.config import Config, DataConfig, from_dict, resolve_data_root
from teskd.data.pipeline import class_count, input_size
from teskd.engine import runtime
from teskd.deploy.source import checkpoint_path, read_checkpoint
from teskd.engine.evaluate import evaluate
from teskd.errors import TeskdError

# --- what is evaluated -------------------------------------------------------------------------


def load_eval_split(data: DataConfig, split: str, device: torch.device):
    """The evaluation loader of ``split`` ("test" or "val") and a description of its images.

    The selection is the one training evaluates on: the test split, or its first
    ``data.test_subset_per_class`` images of each class; the validation split is the last
    ``data.val_per_class`` training images of each class. Only the split needed is read.
    """
    from dataclasses import replace

    from teskd.data.pipeline import build_data

    if split not in ("test", "val"):
        raise TeskdError(f"unknown split {split!r}; expected test or val")
    if split == "val" and data.val_per_class == 0:
        raise TeskdError("this run has no validation split (data.val_per_class=0); use --split test")
    root = resolve_data_root(data)  # data.root, or ${TESKD_DATA:-./data}/<dataset> when null
    loader = getattr(build_data(data, device, 0, splits=(split,)), split)
    subset = data.test_subset_per_class if split == "test" else None
    total = loader.num_samples
    if subset is not None:
        whole = replace(data, test_subset_per_class=None, workers=0)
        total = build_data(whole, torch.device("cpu"), 0, splits=("test",)).test.num_samples
        selection = f"first {subset} test image{'s' if subset != 1 else ''} of each class"
    elif split == "test":
        selection = "all test images"
    else:
        selection = (f"last {data.val_per_class} training image{'s' if data.val_per_class != 1 else ''} "
                     f"of each class, held out from training")
    info = {
        "dataset": data.dataset,
        "split": split,
        "images": loader.num_samples,
        "split_images": total,
        "full_split": loader.num_samples == total,
        "subset_per_class": subset,
        "selection": selection,
        "data_root": str(root.resolve()),  # absolute, symlinks resolved: the folder actually read
    }
    return loader, info


def describe_data(result: dict) -> str:
    """One line: what an evaluation result was computed on."""
    n, total = result["images"], result["split_images"]
    if result["full_split"]:
        size = f"the full {result['split']} split, {n} images"
    else:
        size = f"a subset of the {result['split']} split, {n} of {total} images"
    more = "; --full for all" if result["subset_per_class"] is not None and not result["full_split"] else ""
    return f"{result['dataset']}: {size} ({result['selection']}{more}), read from {result['data_root']}"


# --- run directories and checkpoints ------------------------------------------------------------


def _full_overrides(overrides, split: str, full: bool) -> list[str]:
    overrides = list(overrides)
    if full:
        if split != "test":
            raise TeskdError("--full selects the whole test split; the validation split is always all "
                             "held-out images (data.val_per_class), so use --full with --split test")
        overrides.append("data.test_subset_per_class=null")
    return overrides


def evaluate_checkpoint(target: Path, overrides=(), which: str = "last", split: str = "test",
                        full: bool = False) -> dict:
    """Per-branch top-1/top-5 of a run directory's checkpoint (or a ``.pt`` file), with its config."""
    from teskd.build import assemble_model

    path = checkpoint_path(Path(target), which)
    state = read_checkpoint(path)
    cfg: Config = from_dict(state["config"], _full_overrides(overrides, split, full))
    place = runtime.placement(cfg.train, training=False)
    device, amp = place.device, place.eval_amp_dtype
    num_classes = class_count(cfg.data)
    if num_classes != state["num_classes"]:
        raise TeskdError(f"checkpoint {path} was trained for {state['num_classes']} classes, "
                         f"but {cfg.data.dataset} has {num_classes}")
    loader, info = load_eval_split(cfg.data, split, device)
    with runtime.settings(cfg.train, device):
        _, model = assemble_model(cfg, num_classes, place, weights=state["model"],
                                  mismatch=f"checkpoint {path} does not match {cfg.model.arch}/{cfg.method.name}")
        acc = evaluate(model, loader, device, amp, channels_last=cfg.train.channels_last,
                       progress=cfg.train.progress, desc=split)
    from teskd.engine.checkpoint import describe_weights

    return {"kind": "checkpoint", "checkpoint": str(path), "epoch": state["epoch"],
            "partial": describe_weights(state), "arch": cfg.model.arch,
            "method": cfg.method.name, **info, "precision": runtime.precision_name(amp), "accuracy": acc}


# --- exports of the deployed network (deployed.safetensors, .onnx, .pt2, ...) ---------------------


class DeployedOnly(nn.Module):
    """A bare exported network as ``evaluate`` sees a method in eval mode: one branch, ``deployed`` (an export
    does not record what its method called the branch)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"deployed": self.backbone(images)}


def load_deployed_file(path: Path) -> tuple[nn.Module, dict]:
    """The deployed network of an export (``deployed.safetensors``, ``.onnx``, ``.pt2``) and its metadata."""
    from teskd.deploy.source import is_export_file, load_deployed

    path = Path(path)
    if not is_export_file(path) or not path.exists():
        raise TeskdError(f"no such export file: {path}")
    deployed = load_deployed(path)
    i = deployed.info
    return deployed.model, {"arch": i.arch, "num_classes": i.num_classes, "width_mult": i.width_mult,
                            "trained_on": i.dataset, "teskd_version": i.teskd_version,
                            "input_size": i.input_size, "resize": i.resize, "format": deployed.kind}


def evaluate_deployed(path: Path, overrides=(), split: str = "test", full: bool = False) -> dict:
    """Top-1/top-5 of an export of the deployed network (e.g. ``deployed.safetensors``) on its dataset's test
    split.

    The config is the default one, with ``data.dataset`` from the file's metadata, then
    ``overrides`` (e.g. ``data.root=...``, ``data.test_subset_per_class=5``).
    """
    if split != "test":
        raise TeskdError("an export is evaluated on the test split only; the validation split "
                         "is defined by a run's config (evaluate the run directory with --split val)")
    from teskd.data.registry import DATASETS

    backbone, meta = load_deployed_file(Path(path))
    sizes = {"input_size": meta.pop("input_size"), "resize": meta.pop("resize")}
    base = {"data": {"dataset": meta["trained_on"]}} if meta["trained_on"] else {}
    if meta["trained_on"] in DATASETS.names():
        # evaluate with the sizes the network was trained for (overrides may still change them); a dataset
        # whose spec fixes its sizes (in-memory arrays) ignores them
        base["data"].update(image_size=sizes["input_size"], eval_resize=sizes["resize"])
    cfg: Config = from_dict(base, _full_overrides(overrides, split, full))
    if class_count(cfg.data) != meta["num_classes"]:
        raise TeskdError(f"{path} has a {meta['num_classes']}-class head, but {cfg.data.dataset} has "
                         f"{class_count(cfg.data)} classes (set data.dataset=...)")
    from teskd.deploy.formats import get_format

    if not get_format(meta["format"]).movable:  # compiled graphs run where they were built: the CPU, float32
        cfg.train.device, cfg.train.eval_amp, cfg.train.compile = "cpu", False, False
    device = runtime.resolve_device(cfg.train.device)
    amp = runtime.resolve_eval_amp(cfg.train, device)
    loader, info = load_eval_split(cfg.data, split, device)
    with runtime.settings(cfg.train, device):
        _, model = runtime.prepare_model(DeployedOnly(backbone), cfg.train, device)
        acc = evaluate(model, loader, device, amp, channels_last=cfg.train.channels_last,
                       progress=cfg.train.progress, desc=split)
    return {"kind": "deployed", "checkpoint": str(path), "epoch": None, **meta, **info,
            "precision": runtime.precision_name(amp), "accuracy": acc}


def evaluate_target(target: Path, overrides=(), which: str = "last", split: str = "test",
                    full: bool = False) -> dict:
    """``teskd eval TARGET``: a run directory, a ``.pt`` checkpoint or an export (.safetensors, .onnx, .pt2)."""
    from teskd.deploy.source import is_export_file

    target = Path(target)
    if is_export_file(target):
        return evaluate_deployed(target, overrides, split=split, full=full)
    return evaluate_checkpoint(target, overrides, which=which, split=split, full=full)


def describe_stages(backbone) -> str:
    """T1..T4 of a backbone: channels, stride and where they are read (e.g. 'T1 16ch /4 features.2 input')."""
    taps = getattr(backbone, "taps", None)
    where = [f"{t.module} {t.where}" for t in taps] if taps else [s.module for s in backbone.stage_info]
    return " · ".join(f"T{i + 1} {s.channels}ch /{s.reduction} {w}"
                      for i, (s, w) in enumerate(zip(backbone.stage_info, where)))


def model_info(cfg: Config) -> dict:
    """Parameters and multiply-adds per image, for training (all branches) and deployment.

    ``macs_train`` counts the reference arithmetic of the method; where the configured model
    executes less (TESKD's exact fast students), ``macs_train_executed`` says how much.
    """
    from dataclasses import fields, replace

    from teskd.build import assemble_model
    from teskd.engine.summary import trained_params
    from teskd.models import count_macs, count_params

    reference_cfg = cfg
    if "fast_students" in {f.name for f in fields(cfg.method)}:
        reference_cfg = replace(cfg, method=replace(cfg.method, fast_students=False))
    with torch.device("meta"):  # shapes only: no memory, no compute, instant even for 435M parameters
        method, _ = assemble_model(cfg, class_count(cfg.data))
        reference, _ = assemble_model(reference_cfg, class_count(cfg.data))
    size = input_size(cfg.data)
    shape = (1, 3, size, size)
    forward = lambda m, x: m.eval()(x)  # noqa: E731  (all branches)
    info = {
        "arch": cfg.model.arch,
        "method": cfg.method.name,
        "num_classes": class_count(cfg.data),
        "params_train": trained_params(method),  # frozen networks (KD's teacher) excluded
        "params_deploy": count_params(method.deploy_module),
        "macs_train": count_macs(reference, shape, forward=forward),
        "macs_deploy": count_macs(method.deploy_module, shape),
    }
    with torch.no_grad():  # on the meta device: the branch names only
        branches = list(method.eval()(torch.zeros(shape, device="meta")))
    info["deployed"] = f"{cfg.model.arch} (branch {method.deploy_branch!r}); helpers dropped at export"
    info["branches"] = ", ".join(branches)
    info["stages"] = describe_stages(method.backbone)
    if hasattr(method, "describe_students"):  # TESKD: what the students (and feature projections) cost
        info["students"] = method.describe_students()
        info["params_students"] = method.student_param_count()
    executed = count_macs(method, shape, forward=forward)
    if executed != info["macs_train"]:
        info["macs_train_executed"] = executed  # after the exact rewrites of the fast students
    return info
