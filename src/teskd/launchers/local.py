"""``teskd sweep FILE --launcher local --jobs N``: N runs at once on this machine, each its own
``teskd train ... --resume RUN`` process with its output in ``<out>/.sweep/logs/<run>.log``.

On GPUs each run gets ``gpus_per_run`` devices of its own (CUDA_VISIBLE_DEVICES; several through torchrun);
on CPUs the cores are divided between the runs (``train.threads``, where the run's config leaves it at 0).
SIGINT/SIGTERM is passed on to the runs once (each saves and stops), then the sweep says how to continue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from teskd.config import load_config
from teskd.engine.signals import stop_on_signals
from teskd.errors import TeskdError
from teskd.launchers.runlock import lock_holder, refused_holder
from teskd.launchers.state import SweepState


def train_argv(run) -> list[str]:
    """``PlannedRun.command()`` as the arguments after ``teskd``."""
    return ["train", str(run.config), *run.overrides, "--out", str(run.out), "--resume", str(run.out)]


@dataclass
class Slot:
    gpus: list[str] | None  # CUDA_VISIBLE_DEVICES of the runs in this slot, None on the CPU
    threads: int  # CPU threads of a run in this slot (0: torch's default)


@dataclass
class Child:
    run: object
    slot: Slot
    proc: subprocess.Popen
    log: Path
    epoch: int = -1
    shown: list = field(default_factory=list)


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d for d in named.split(",") if d.strip()] if named else [str(i) for i in range(torch.cuda.device_count())]


def plan_slots(jobs: int, gpus_per_run: int, say: Callable[[str], None]) -> list[Slot]:
    """``jobs`` slots: disjoint GPU sets where there are GPUs, else the CPU cores divided (logged)."""
    if jobs < 1 or gpus_per_run < 1:
        raise TeskdError(f"--jobs and gpus per run must be at least 1 (got {jobs} and {gpus_per_run})")
    gpus = _visible_gpus()
    if gpus:
        fit = len(gpus) // gpus_per_run
        if fit == 0:
            raise TeskdError(f"{gpus_per_run} GPUs per run, but this machine shows {len(gpus)}")
        if fit < jobs:
            say(f"{len(gpus)} GPUs, {gpus_per_run} per run: {fit} runs at once, not {jobs}")
        slots = [Slot(gpus[i * gpus_per_run:(i + 1) * gpus_per_run], 0) for i in range(min(jobs, fit))]
        say("GPUs per run: " + "; ".join(",".join(s.gpus) for s in slots))
        return slots
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    say(f"CPU: {cores} cores for {jobs} runs at once: train.threads={threads} each "
        f"(runs whose config sets train.threads keep theirs)")
    return [Slot(None, threads) for _ in range(jobs)]


def child_command(run, slot: Slot) -> tuple[list[str], dict]:
    """The process that trains ``run`` in ``slot`` and its environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = train_argv(run)
    if slot.gpus is None:
        if load_config(run.config, list(run.overrides)).train.threads == 0:
            argv += [f"train.threads={slot.threads}"]  # operational: the run's results do not depend on it
        env["OMP_NUM_THREADS"] = str(slot.threads)
        return [sys.executable, "-m", "teskd", *argv], env
    env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
    if len(slot.gpus) == 1:
        return [sys.executable, "-m", "teskd", *argv], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(slot.gpus)}",
            "-m", "teskd", *argv], env


class LocalLauncher:
    """Runs ``runs`` (those not done) ``jobs`` at a time; returns (name, message) of the failed ones."""

    def __init__(self, sweep, runs, jobs: int, gpus_per_run: int = 1, say: Callable[[str], None] = print,
                 poll_s: float = 0.5):
        self.sweep, self.runs, self.say, self.poll_s = sweep, list(runs), say, poll_s
        self.slots = plan_slots(jobs, gpus_per_run, say)
        self.state = SweepState(sweep.out)
        self.stop_signal: str | None = None  # set by stop_on_signals
        self.outcome: dict[str, str] = {}  # run name -> done | trained | failed | locked | stopped

    def run(self) -> list[tuple[str, str]]:
        from teskd.sweep_status import run_status

        pending, active, failures = [], [], []
        for run in self.runs:
            if run_status(run).kind == "done":
                self.outcome[run.name] = "done"
                self.say(f"{run.name}: done, skipped")
            else:
                pending.append(run)
        free = list(self.slots)
        with stop_on_signals(self):
            try:
                self._loop(pending, active, free, failures)
            except KeyboardInterrupt:  # a second signal: the runs stop at once (their last checkpoint stays)
                self._signal_all(active)
                self._wait_all(active, failures)
        return failures

    def _loop(self, pending, active, free, failures) -> None:
        forwarded = False
        while pending or active:
            if self.stop_signal and not forwarded:
                self._signal_all(active)
                forwarded = True
            while pending and free and not self.stop_signal:
                self._start(pending.pop(0), free.pop(0), active)
            for child in [c for c in active if c.proc.poll() is not None]:
                active.remove(child)
                free.append(child.slot)
                self._finished(child, failures)
            for child in active:
                self._progress(child)
            if self.stop_signal and not active:
                break
            time.sleep(self.poll_s)
        for run in pending:
            self.outcome.setdefault(run.name, "not started")

    def _start(self, run, slot: Slot, active: list) -> None:
        holder = lock_holder(run.out)
        if holder is not None:
            self.outcome[run.name] = "locked"
            self.say(f"{run.name}: locked by {holder} (another process trains it); not started")
            return
        argv, env = child_command(run, slot)
        log = self.state.log_path(run.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:  # its own session: a Ctrl-C reaches the sweep, which passes it on once
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.state.record(run.name, launcher="local", pid=proc.pid, log=str(log), gpus=slot.gpus)
        where = f"GPU {','.join(slot.gpus)}" if slot.gpus else f"{slot.threads} thread" + "s" * (slot.threads > 1)
        self.say(f"{run.name}: started (pid {proc.pid}, {where}, log {log})")
        active.append(Child(run, slot, proc, log))

    def _progress(self, child: Child) -> None:
        from teskd.sweep_status import run_status

        status = run_status(child.run)
        if status.done != child.epoch:
            child.epoch = status.done
            self.say(f"{child.run.name}: running, epoch {status.done}/{status.total}")

    def _finished(self, child: Child, failures: list) -> None:
        from teskd.sweep_status import run_status

        code, name = child.proc.returncode, child.run.name
        self.state.update(name, exit=code)
        status = run_status(child.run)
        if code == 0:
            self.outcome[name] = "trained"
            self.say(f"{name}: done, {status.done}/{status.total} epochs")
            return
        tail = _tail(child.log)
        holder = refused_holder(tail)
        if holder is not None:
            self.outcome[name] = "locked"
            self.say(f"{name}: locked by {holder} (another process trains it)")
        elif self.stop_signal or code in (130, 128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGINT):
            self.outcome[name] = "stopped"
            self.say(f"{name}: stopped after {status.done}/{status.total} epochs (checkpoint kept)")
        else:
            message = _last_error(tail) or f"exit code {code}"
            self.outcome[name] = "failed"
            failures.append((name, message))
            self.say(f"{name}: failed: {message} (log {child.log})")

    def _signal_all(self, active) -> None:
        for child in active:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def _wait_all(self, active, failures) -> None:
        for child in list(active):
            child.proc.wait()
            self._finished(child, failures)


def _tail(log: Path, size: int = 8192) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_error(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else None


def summary_line(sweep, outcome: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for kind in outcome.values():
        counts[kind] = counts.get(kind, 0) + 1
    order = ["done", "trained", "stopped", "locked", "failed", "not started"]
    parts = [f"{counts[k]} {'already done' if k == 'done' else k}" for k in order if counts.get(k)]
    failed = [n for n, k in outcome.items() if k in ("failed", "locked")]
    runs = f"{len(outcome)} run" + ("" if len(outcome) == 1 else "s")
    return f"sweep {sweep.path}: {runs}: {', '.join(parts)}" + (f" ({', '.join(failed)})" if failed else "")
