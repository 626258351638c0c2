"""``teskd sweep FILE --status`` and ``--cancel``: what each run is doing, whoever trains it.

A run's progress comes from its folder (summary.json, metrics.jsonl); who trains it from its writer lock
and the sweep's state file (the local process, or the Slurm job and what the scheduler says of it)."""

from __future__ import annotations

import os
import signal
from typing import Callable

from teskd.errors import TeskdError
from teskd.launchers.run_state import run_state
from teskd.launchers.state import SweepState
from teskd.sweep_status import run_status


def status_rows(sweep, runs) -> list[dict]:
    from teskd.launchers.slurm import scheduler_states

    state = SweepState(sweep.out)
    jobs = scheduler_states([e.get("job") for e in state.runs.values() if e.get("launcher") == "slurm"])
    rows = []
    for run in runs:
        entry = state.runs.get(run.name, {})
        status = run_status(run)
        rows.append({"run": run.name, "state": run_state(run, entry, jobs), "epoch": f"{status.done}/{status.total}",
                     "launcher": entry.get("launcher", "-"), "job": str(entry.get("job", entry.get("pid", "-"))),
                     "log": entry.get("log", "-")})
    return rows


def print_status(sweep, runs, say: Callable[[str], None] = print) -> int:
    rows = status_rows(sweep, runs)
    keys = ["run", "state", "epoch", "launcher", "job", "log"]
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys[:-1]}
    say("  ".join(f"{k:<{widths[k]}}" for k in keys[:-1]) + "  log")
    for r in rows:
        say("  ".join(f"{r[k]:<{widths[k]}}" for k in keys[:-1]) + f"  {r['log']}")
    counts: dict[str, int] = {}
    for r in rows:
        kind = r["state"].split(" ")[0]
        counts[kind] = counts.get(kind, 0) + 1
    say(f"sweep {sweep.path}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


def cancel_runs(sweep, runs, say: Callable[[str], None] = print) -> int:
    """SIGTERM to the sweep's local processes, ``scancel --signal=TERM`` then ``scancel`` of its Slurm jobs:
    a running run saves and stops; a queued one is removed. Run the sweep again to continue."""
    from teskd.launchers.slurm import cancel_job, scheduler_states

    state = SweepState(sweep.out)
    jobs = scheduler_states([e.get("job") for e in state.runs.values() if e.get("launcher") == "slurm"])
    cancelled = 0
    for run in runs:
        entry = state.runs.get(run.name, {})
        now = run_state(run, entry, jobs)
        if now not in ("running", "queued"):
            continue
        if entry.get("launcher") == "local":
            try:
                os.kill(int(entry["pid"]), signal.SIGTERM)
            except (OSError, KeyError, ValueError) as exc:
                raise TeskdError(f"cannot stop {run.name} (pid {entry.get('pid')}): {exc}") from exc
        else:
            cancel_job(str(entry["job"]), running=now == "running")
        cancelled += 1
        say(f"{run.name}: {now} -> cancelled ({'it saves and stops' if now == 'running' else 'removed from the queue'})")
    say(f"sweep {sweep.path}: {cancelled} runs cancelled; run the sweep again to resume them")
    return 0
