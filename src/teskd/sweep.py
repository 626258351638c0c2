"""``teskd sweep``: the runs a sweep file plans (:mod:`teskd.sweep_plan`, which documents the file), trained
one after another in this process (the default) or by a launcher (:mod:`teskd.launchers`: ``--launcher
local --jobs N``, ``--launcher slurm``); ``--collect`` copies their small files.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from teskd import fileio
from teskd.engine.rundir import CONFIG, METRICS, SUMMARY, RunDir
from teskd.engine.signals import Interrupted, stop_on_signals
from teskd.errors import TeskdError, one_line
from teskd.sweep_plan import PlannedRun, Sweep, grid_tag, load_sweep, override_text, select  # noqa: F401 (the API)
from teskd.sweep_status import RunStatus, run_status, saved_differences  # noqa: F401 (the API)

COLLECTED = (CONFIG, METRICS, SUMMARY)  # the small files --collect copies; never checkpoints


def run_one(run: PlannedRun) -> str:
    """Train ``run`` as ``teskd train CONFIG OVERRIDES --out RUN --resume RUN`` does (fresh, resumed, or
    artifacts rewritten), unless it is done: then nothing is built. Returns "done" or "trained"."""
    if run_status(run).kind == "done":
        return "done"
    from teskd.api import train

    train(str(run.config), out=run.out, resume=True, overrides=list(run.overrides))
    return "trained"


# --- stopping -------------------------------------------------------------------------------------------

class SweepStopped(TeskdError):
    """SIGINT/SIGTERM stopped the sweep; running it again resumes (exit code 128 + signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _StopWatch:
    """What :func:`teskd.engine.signals.stop_on_signals` sets: the first SIGINT/SIGTERM asks the sweep to stop
    before its next run (and the run training now to save and stop: it inherits the request); a signal the
    run's trainer received is the sweep's too, so a run that finished anyway is not followed by the next."""

    stop_signal: str | None = None


def _exit_code(name: str) -> int:
    return 128 + getattr(signal, name, signal.SIGINT)


def run_sweep(sweep: Sweep, runs: list[PlannedRun], say: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Train ``runs`` one after another. A run failing with a TeskdError is reported and the next one
    started; returns the failures as (name, message). SIGINT/SIGTERM stops the sweep (after the current run
    has saved) with SweepStopped."""
    again = f"run `teskd sweep {sweep.path}` again to resume (finished runs are skipped)"
    from teskd.launchers.runlock import lock_holder

    failures, trained, skipped, locked = [], 0, 0, []
    watch = _StopWatch()
    with stop_on_signals(watch):
        previous = None
        for i, run in enumerate(runs, 1):
            try:
                name = watch.stop_signal
                if name:
                    where = f"while {previous} ran (it ended before it could stop)" if previous else "at its start"
                    raise SweepStopped(f"{name} received {where}; the sweep stopped before {run.name}: {again}",
                                       _exit_code(name))
                status = run_status(run)
                head = f"[{i}/{len(runs)}] {run.name}"
                if status.kind == "done":
                    say(f"{head}: done ({status.total} epochs), skipped")
                    skipped += 1
                    continue
                holder = lock_holder(run.out)
                if holder is not None:  # another sweep or `teskd train` is training it: not a failure
                    say(f"{head}: locked by {holder} (another process trains it); skipped")
                    locked.append(run.name)
                    continue
                say(f"{head}: {status} -> {run.command()}")
                try:
                    run_one(run)
                    trained += 1
                except Interrupted as exc:  # the trainer saved and stopped
                    raise SweepStopped(f"{exc}; the sweep stopped at {run.name}: {again}", exc.exit_code) from exc
                except TeskdError as exc:
                    failures.append((run.name, str(exc)))
                    say(f"{head}: failed: {exc}")
                previous = run.name
            except KeyboardInterrupt as exc:
                name = watch.stop_signal or "SIGINT"
                raise SweepStopped(f"{name} received: the sweep stopped at {run.name} (its last checkpoint, if "
                                   f"any, is kept): {again}", _exit_code(name)) from exc
    say(f"sweep {sweep.path}: {len(runs)} runs: {skipped} already done, {trained} trained, {len(failures)} failed"
        + (f" ({', '.join(n for n, _ in failures)})" if failures else "")
        + (f", {len(locked)} locked by other processes ({', '.join(locked)})" if locked else ""))
    return failures


# --- collect --------------------------------------------------------------------------------------------

def collect(runs: list[PlannedRun], dest: Path, all_runs=None, say: Callable[[str], None] = print) -> int:
    """Copy each run's config.yaml, metrics.jsonl and summary.json (never checkpoints) into
    ``dest/<run name>/``, replacing an earlier collection of it; returns how many runs were collected."""
    dest = Path(dest)
    folders = [r.out.resolve() for r in (all_runs or runs)]
    for run in runs:
        target = (dest / run.name).resolve()
        if any(target == f or f in target.parents or target in f.parents for f in folders):
            raise TeskdError(f"--collect {dest} would write into (or over) the run folders; choose a folder "
                             f"outside {runs[0].out.parent}")
    count = 0
    for run in runs:
        src = RunDir(run.out)
        present = [name for name in COLLECTED if (src.path / name).is_file()]
        if not present or run_status(run).done == 0:  # nothing a report could read yet
            say(f"{run.name}: no finished epoch yet, nothing to collect")
            continue
        target = dest / run.name
        try:
            # read before anything is written: a file that is not a regular one of run-file size stops here
            contents = {name: fileio.read_bytes(src.path / name, "run file", fileio.RUN_FILE_LIMIT)
                        for name in present}
            target.mkdir(parents=True, exist_ok=True)
            for name in COLLECTED:
                if name in present:
                    fileio.atomic_write_bytes(target / name, contents[name])
                else:  # e.g. the summary.json of an earlier collection, before the run was extended
                    fileio.remove(target / name)
        except OSError as exc:
            raise TeskdError(f"cannot collect {run.name} into {target} ({one_line(exc, 200)})") from exc
        count += 1
        say(f"{run.name}: {' '.join(present)} -> {target}")
    return count


# --- the command ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchOptions:
    launcher: str = "serial"  # serial (this process) | local (--jobs processes) | slurm (submitit)
    jobs: int = 1
    gpus_per_run: int | None = None
    slurm: tuple = ()  # key=value settings of the Slurm launcher from the command line


def sweep_command(path: Path, only: str | None = None, dry_run: bool = False, list_only: bool = False,
                  collect_to: Path | None = None, run: bool = True, say: Callable[[str], None] = print,
                  launch: LaunchOptions = LaunchOptions(), status: bool = False, cancel: bool = False) -> int:
    """``teskd sweep``: validate the whole file, then list, dry-run, report, cancel, or train (and collect)."""
    if list_only and dry_run:
        raise TeskdError("--list and --dry-run: pass one of them")
    if not run and collect_to is None:
        raise TeskdError("--no-run only makes sense with --collect DIR")
    sweep = load_sweep(path)
    runs = select(sweep.runs, only)
    if list_only:
        for r in runs:
            say(r.name)
        return 0
    if status or cancel:
        from teskd.launchers.status import cancel_runs, print_status

        return cancel_runs(sweep, runs, say) if cancel else print_status(sweep, runs, say)
    if dry_run:
        _dry_run(sweep, runs, collect_to, say)
        return 0
    failures = launch_runs(sweep, runs, launch, say) if run else []
    if collect_to is not None:
        n = collect(runs, collect_to, sweep.runs, say)
        say(f"collected {n} of {len(runs)} runs into {collect_to}")
    return 1 if failures else 0


def _dry_run(sweep: Sweep, runs: list[PlannedRun], collect_to, say) -> None:
    say(f"sweep {sweep.path}: {len(runs)} of {len(sweep.runs)} runs into {sweep.out} "
        f"(in order: variant, grid, seed)")
    width = max(len(r.name) for r in runs)
    for r in runs:
        status = run_status(r)
        differs = saved_differences(r)
        note = (f"  (its {CONFIG} differs from the sweep's config in {', '.join(differs[:5])}; resuming keeps "
                f"{CONFIG}'s)" if differs else "")
        say(f"{r.name:<{width}}  {status}{note}")
        say(f"    {r.command()}")
    if collect_to is not None:
        say(f"then: collect {', '.join(COLLECTED)} of each run into {collect_to}/<run name>/")


def launch_runs(sweep: Sweep, runs: list[PlannedRun], launch: LaunchOptions, say) -> list[tuple[str, str]]:
    """Train ``runs`` with the chosen launcher; returns the failures (name, message)."""
    if launch.launcher == "serial":
        return run_sweep(sweep, runs, say)
    if launch.launcher == "slurm":
        from teskd.launchers.slurm import submit_sweep

        return submit_sweep(sweep, runs, launch, say)
    if launch.launcher != "local":
        raise TeskdError(f"--launcher {launch.launcher!r}: expected serial, local or slurm")
    from teskd.launchers.local import LocalLauncher, summary_line

    local = LocalLauncher(sweep, runs, launch.jobs, launch.gpus_per_run or 1, say)
    failures = local.run()
    say(summary_line(sweep, local.outcome))
    if local.stop_signal:
        again = f"teskd sweep {sweep.path} --launcher local --jobs {launch.jobs}"
        raise SweepStopped(f"{local.stop_signal} received: the runs saved and stopped; run `{again}` again to "
                           f"resume (finished runs are skipped)", _exit_code(local.stop_signal))
    return failures
