"""``summary.json``: the headline numbers of a finished run, from its metrics log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from teskd.config import Config
from teskd.errors import TeskdError
from teskd.engine.runtime import Placement, precision_name
from teskd.models import count_macs, count_params
from teskd.runfiles import deployed_key


@dataclass(frozen=True)
class RunTotals:
    """What the trainer counted over the whole run (all processes of a resumed run together)."""

    best_epoch: int
    train_seconds: float
    train_images: int
    has_val: bool  # the best epoch was selected on the validation split


def summarise(records: list[dict], cfg: Config, method, place: Placement, image_size: int, totals: RunTotals,
              metrics_path: Path, run_dir: Path) -> dict:
    """Numbers of the deployed branch (``deployed_*`` keys, whatever the method calls it; ``deployed_branch``
    names it). A run resumed across the teacher -> deployed rename has old records that call it ``teacher``:
    each record is read with :func:`teskd.runfiles.deployed_key`."""
    if not records:
        raise TeskdError(f"no finished epoch in {run_dir}; nothing to summarise")
    branch = method.deploy_branch
    records = [r for r in records if "test_acc" in r]  # evaluated epochs (train.eval_every); the last always is
    last = records[-1]
    best = next((r for r in records if r["epoch"] == totals.best_epoch), None)
    if best is None:
        raise TeskdError(f"{metrics_path} has no record of the best epoch {totals.best_epoch}; "
                         f"the file was edited or damaged")
    seconds, images = totals.train_seconds, totals.train_images
    summary = {
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "dataset": cfg.data.dataset,
        "width_mult": cfg.model.width_mult,
        "seed": cfg.train.seed,
        "epochs": last["epoch"],
        "deployed_branch": branch,
        "deployed_top1_last": last["test_acc"][deployed_key(last, branch)],
        "deployed_top5_last": last["test_top5"][deployed_key(last, branch)],
        "deployed_top1_best": best["test_acc"][deployed_key(best, branch)],
        "best_epoch": totals.best_epoch,
        "selected_on": "val" if totals.has_val else "test",
        # the paper's protocol: the maximum test accuracy over epochs (optimistic; for comparison only)
        "deployed_top1_max_test": max(r["test_acc"][deployed_key(r, branch)] for r in records),
        "test_acc_last": last["test_acc"],
        **cost(method, image_size),
        "train_images_per_sec": images / seconds if seconds else None,  # JSON has no NaN (runfiles refuses it)
        "train_hours": seconds / 3600,
        "device": str(place.device),
        "amp": str(place.amp_dtype).replace("torch.", "") if place.amp_dtype else "off",
        "eval_precision": precision_name(place.eval_amp_dtype),
        "torch": torch.__version__,
    }
    if totals.has_val:
        summary["deployed_val_top1_best"] = best["val_acc"][deployed_key(best, branch)]
    return summary


def cost(method, size: int) -> dict:
    """Parameters (trained: what the optimizer updates; deployed) and MACs per image (training forward of
    every branch, frozen networks such as KD's teacher included, vs the deployed network alone)."""
    shape = (1, 3, size, size)
    return {"params_train": trained_params(method), "params_deploy": count_params(method.deploy_module),
            "macs_train": count_macs(method, shape, forward=lambda m, x: m.forward_eval(x)),
            "macs_deploy": count_macs(method.deploy_module, shape)}


def trained_params(method) -> int:
    """Parameters the optimizer updates (frozen networks, such as KD's teacher, excluded)."""
    return sum(p.numel() for group in method.param_groups() for p in group["params"])
