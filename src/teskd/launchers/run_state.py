"""One run's state in a sweep, whoever trains it: from its folder, its writer lock and what the launcher
recorded (the local process id, or the Slurm job and what the scheduler says of it)."""

from __future__ import annotations

import os
import signal

from teskd.launchers.runlock import holder_pid, lock_holder
from teskd.sweep_status import run_status


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def run_state(run, entry: dict, jobs: dict) -> str:
    """new | queued | running | stopped | done | failed | locked | cancelled, from the folder, the lock and the
    launcher (``jobs``: Slurm job id -> scheduler state)."""
    status = run_status(run)
    if status.kind == "done":
        return "done"
    holder = lock_holder(run.out)
    launcher = entry.get("launcher")
    job_state = jobs.get(str(entry.get("job"))) if launcher == "slurm" else None
    if holder is not None:
        ours = (launcher == "local" and holder_pid(holder) == entry.get("pid")) or job_state == "RUNNING"
        return "running" if ours else f"locked by {holder}"
    if launcher == "slurm" and job_state in ("PENDING", "REQUEUED", "CONFIGURING"):
        return "queued"
    if launcher == "slurm" and job_state == "RUNNING":
        return "running"  # started, not yet holding the folder
    if launcher == "local" and entry.get("exit") is None and _pid_alive(entry.get("pid")):
        return "running"
    if job_state and job_state.startswith("CANCELLED"):
        return "cancelled"
    failed = (job_state in ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
              or entry.get("exit") not in (None, 0, 130, 128 + signal.SIGTERM, -signal.SIGTERM))
    if failed:
        return "failed"
    return "new" if status.kind == "new" else "stopped"
