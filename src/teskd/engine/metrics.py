"""Accuracy counting and the per-epoch metrics log."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from teskd import fileio
from teskd.errors import TeskdError
from teskd.log import log


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
        """The epoch records. ``check``: a stricter test of each record; ``on_torn(line)``: told about a
        torn last line, which is dropped (default: a logged warning). Any other bad line is a TeskdError."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TeskdError(f"cannot read {self.path}: {' '.join(str(exc).split())[:200]}") from exc
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        records = []
        for number, line in numbered:
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                    raise ValueError("not an object with an integer epoch")
                if check is not None and not check(record):
                    raise ValueError("not a complete epoch record")
            except ValueError as exc:
                if number == numbered[-1][0]:  # torn by a kill while it was being written: that epoch is redone
                    (on_torn or self._warn_torn)(number)
                    break
                raise TeskdError(f"{self.path} line {number} is not an epoch record ({exc}); "
                                 f"the file is damaged or was edited") from exc
            records.append(record)
        return records

    def _warn_torn(self, number: int) -> None:
        log.warning(f"warning: ignoring the incomplete last line ({number}) of {self.path}")

    def reset(self) -> None:
        fileio.atomic_write_text(self.path, "")

    def truncate_after(self, epoch: int) -> None:
        """Drop records past ``epoch`` (epochs logged after the checkpoint we resume from), atomically."""
        keep = [r for r in self.read() if r["epoch"] <= epoch]
        fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: lively on a terminal, sparse in a log file."""
    return 0.1 if sys.stderr.isatty() else 30.0
