"""Accuracy counting and the per-epoch metrics log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k scores, for each k (k capped at #classes)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top.eq(labels[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per finished epoch."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop records past ``epoch`` (epochs logged after the checkpoint we resume from)."""
        keep = [r for r in self.read() if r["epoch"] <= epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: lively on a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0
