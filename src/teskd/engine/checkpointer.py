"""The checkpoint policy of a run: ``last.pt`` after every epoch (and every N steps), ``best.pt`` as a
link to the best epoch's ``last.pt``, resume from the newest verified one. Only the primary rank writes."""

from __future__ import annotations

from pathlib import Path

from teskd import fileio
from teskd.engine import distributed
from teskd.engine.checkpoint import load_latest, publish_copy, read_digests, save_checkpoint
from teskd.engine.rundir import RunDir, RunLock
from teskd.log import log


class Checkpointer:
    def __init__(self, run: RunDir, lock: RunLock | None = None):
        self.run = run
        self.lock = lock

    def check_run_dir(self) -> None:
        """Raise if the run folder vanished under us (never recreate it without its config)."""
        if self.lock is not None:
            self.lock.check()

    def save(self, state: dict, best: bool = False) -> None:
        """Write ``last.pt``; with ``best``, publish that same file as ``best.pt``."""
        if not distributed.is_primary():
            return
        self.check_run_dir()
        digest = save_checkpoint(state, self.run.last, create_parent=False)
        if best:
            publish_copy(self.run.last, digest, self.run.best)

    def load(self) -> tuple[dict, Path]:
        return load_latest(self.run.last)

    def repair_best(self, state: dict, used: Path) -> None:
        """A kill between saving ``last.pt`` and publishing it as ``best.pt`` leaves best.pt behind: redo it."""
        best = state.get("best") or {}
        if "optimizer" not in state or not best.get("epoch") or not distributed.is_primary():
            return
        best_pt = self.run.best
        if best["epoch"] == state["epoch"] and state.get("progress") is None:
            digest = fileio.file_digest(used)
            if not best_pt.is_file() or fileio.file_digest(best_pt) != digest:
                publish_copy(used, digest, best_pt)
        elif not best_pt.is_file() or fileio.file_digest(best_pt) not in read_digests(best_pt):
            log.warning(f"warning: {best_pt} is missing or damaged; it is written again when the deployed network "
                        f"next improves")
