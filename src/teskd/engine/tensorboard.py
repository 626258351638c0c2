"""Optional TensorBoard event files (``train.tensorboard=true``): a live view of ``metrics.jsonl``.

``metrics.jsonl`` stays the source of truth; the events repeat each finished epoch's record, at
global step = the epoch number, under these tags:

* ``test_acc/<branch>``, ``test_top5/<branch>``, ``val_acc/<branch>``, ``train_acc/<branch>``
* ``loss/train_loss`` and ``loss/<part>`` for every ``loss_*`` part (named as in metrics.jsonl)
* ``lr``, ``throughput/train_images_per_sec``, ``throughput/data_wait_share``, ``time/epoch_seconds``

The events go to ``RUN/tensorboard/events.out.tfevents.*`` (written by TensorBoard's own writer, not
through :mod:`teskd.fileio`: a kill loses at most the unflushed tail, which the resume rewrites).
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from teskd.errors import TeskdError, one_line

MISSING = ("train.tensorboard=true needs the optional package tensorboard, which is not installed: "
           "pip install 'teskd[tensorboard]'")

_PER_BRANCH = ("test_acc", "test_top5", "val_acc", "train_acc")
_SCALARS = {"lr": "lr", "train_images_per_sec": "throughput/train_images_per_sec",
            "data_wait_share": "throughput/data_wait_share", "epoch_seconds": "time/epoch_seconds"}


def summary_writer_class():
    """torch's ``SummaryWriter``, or the one-line TeskdError when tensorboard is not installed.

    ``tensorboard`` is imported first, on its own: torch's wrapper module may already be imported (and
    cached) in a process where tensorboard itself has since become unimportable.
    """
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TeskdError(MISSING) from exc
    return SummaryWriter


def _number(value) -> float | None:
    """``value`` as a finite float, or None (strings, bools, NaN and infinities are not plotted)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def epoch_scalars(record: dict) -> dict[str, float]:
    """The ``{tag: value}`` pairs of one metrics.jsonl record (finite numbers only)."""
    pairs: list[tuple[str, object]] = []
    for key in _PER_BRANCH:
        branches = record.get(key)
        if isinstance(branches, dict):
            pairs += [(f"{key}/{branch}", v) for branch, v in branches.items()]
    pairs += [(f"loss/{k}", v) for k, v in record.items() if k == "train_loss" or k.startswith("loss_")]
    pairs += [(tag, record.get(key)) for key, tag in _SCALARS.items()]
    return {tag: x for tag, v in pairs if (x := _number(v)) is not None}


class TensorBoardLog:
    """Writes epoch records as TensorBoard scalars into ``log_dir``.

    ``purge_step``: on resume, the first epoch this process will log (``start_epoch + 1``). TensorBoard
    then discards the events at that step and later that an earlier, killed process had already written,
    so a redone epoch is not drawn twice.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        writer_class = summary_writer_class()
        self.log_dir = Path(log_dir)
        try:
            self.writer = writer_class(log_dir=str(self.log_dir), purge_step=purge_step)
        except OSError as exc:
            raise TeskdError(f"cannot write TensorBoard events to {self.log_dir}: {one_line(exc, 200)}") from exc

    def log_epoch(self, record: dict) -> None:
        step = int(record["epoch"])
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # epochs are minutes apart: keep the events current for a live TensorBoard

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
