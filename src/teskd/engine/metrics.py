"""Accuracy counting and the per-epoch metrics log."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from teskd import fileio
from teskd.runfiles import read_metrics


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at #classes)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top.eq(labels[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per finished epoch.

    Lines are appended with one write each, so a kill can leave at most a torn last line;
    reading drops such a line (with a warning) and a resume rewrites the file atomically.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        fileio.append_line(self.path, json.dumps(record))

    def read(self, check: Callable[[dict], bool] | None = None,
             on_torn: Callable[[int], None] | None = None) -> list[dict]:
        """The epoch records (:func:`teskd.runfiles.read_metrics`: a file from a stranger is read with bounds).
        ``check``: a stricter test of each record; ``on_torn(line)``: told about a torn last line, which is
        dropped (default: a logged warning). Any other bad line is a TeskdError."""
        return read_metrics(self.path, check, on_torn)

    def reset(self) -> None:
        fileio.atomic_write_text(self.path, "")

    def truncate_after(self, epoch: int) -> None:
        """Drop records past ``epoch`` (epochs logged after the checkpoint we resume from), atomically."""
        keep = [r for r in self.read() if r["epoch"] <= epoch]
        fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: lively on a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0
