"""Where a planned run of a sweep stands on disk: new, partial k/N, done or ahead; and where its saved
config differs from the sweep's (a resume keeps the saved one)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from teskd import runfiles
from teskd.config import dotted, load_config, to_dict
from teskd.engine.rundir import RunDir
from teskd.errors import TeskdError
from teskd.sweep_plan import PlannedRun


@dataclass(frozen=True)
class RunStatus:
    kind: str  # new | partial | done | ahead (finished more epochs than configured)
    done: int  # epochs finished (0 when unknown)
    total: int  # epochs the run would train to
    problem: str | None = None  # a run file that could not be read (the status is then a lower bound)

    def __str__(self) -> str:
        if self.kind == "partial":
            text = f"partial {self.done}/{self.total} epochs"
        elif self.kind == "ahead":
            text = f"ahead: {self.done} epochs finished, train.epochs={self.total} (it would fail)"
        else:
            text = self.kind
        return text + (f" (unreadable: {self.problem})" if self.problem else "")


def _saved_config(run: PlannedRun):
    """The config a requeue would train with: the run's own config.yaml plus the sweep's overrides."""
    return load_config(RunDir(run.out).config, list(run.overrides))


def run_status(run: PlannedRun) -> RunStatus:
    """new (no checkpoint or config.yaml yet), partial k/N, done (summary.json of N epochs) or ahead,
    where N is what ``teskd train ... --resume RUN`` would train to (its config.yaml + the overrides)."""
    rd = RunDir(run.out)
    total = run.epochs
    if rd.config.is_file():
        with contextlib.suppress(TeskdError):
            total = _saved_config(run).train.epochs
    problems, finished = [], None
    if os.path.lexists(rd.summary):
        try:
            finished = runfiles.read_summary(rd)["epochs"]
        except TeskdError as exc:
            problems.append(str(exc))
    if finished == total:
        return RunStatus("done", finished, total)
    if not (rd.path.is_dir() and (rd.config.is_file() or rd.has_checkpoint())):
        return RunStatus("new", 0, total, "; ".join(problems) or None)
    try:
        records = runfiles.read_metrics(rd.metrics, on_torn=lambda n: None)
    except TeskdError as exc:
        problems.append(str(exc))
        records = []
    done = max([records[-1]["epoch"] if records else 0, finished or 0])
    return RunStatus("ahead" if done > total else "partial", done, total, "; ".join(problems) or None)


def saved_differences(run: PlannedRun) -> list[str]:
    """Settings where an existing run's config.yaml (which a resume keeps) differs from the sweep's config."""
    from teskd.report import is_operational

    if not RunDir(run.out).config.is_file():
        return []
    try:
        saved, planned = (dotted(to_dict(c)) for c in (_saved_config(run), load_config(run.config, list(run.overrides))))
    except TeskdError:
        return []
    return [k for k in sorted(set(saved) | set(planned)) if not is_operational(k) and saved.get(k) != planned.get(k)]
