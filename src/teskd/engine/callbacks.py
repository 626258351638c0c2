"""What the trainer tells the rest of a run: the epochs' records and the run's end.

The trainer trains, checkpoints and resumes; everything else a run does with its numbers (TensorBoard
events, the exported network, ``summary.json``, ``curves.png``) is a callback that the assembly
(:mod:`teskd.launch`) hands it. Callbacks run on the primary rank only, in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class RunStart:
    run_dir: Path
    start_epoch: int  # epochs already completed (a resumed run continues after them)
    resumed: bool  # the run was started with ``resume`` (events past ``start_epoch`` are stale)


@dataclass(frozen=True)
class RunEnd:
    run_dir: Path
    summary: dict  # the headline numbers (:func:`teskd.engine.summary.summarise`)
    records: list[dict]  # every epoch's record, as metrics.jsonl holds them
    method: nn.Module  # the trained method (``deploy_module``/``deploy_branch``: what is deployed)
    num_classes: int
    classes: list[str] | None


class Callback:
    """Hooks of a run; each does nothing unless overridden. ``close`` runs however the run ends."""

    def on_run_start(self, start: RunStart) -> None:
        """After the folder is prepared and any checkpoint loaded, before the first epoch."""

    def on_epoch_end(self, record: dict) -> None:
        """After the epoch's record is appended to metrics.jsonl, before its checkpoint."""

    def on_run_end(self, end: RunEnd) -> None:
        """After the last epoch (or at once, when a resumed run had already finished)."""

    def close(self) -> None:
        """Release what ``on_run_start`` opened; also after an error or an interruption."""
