"""``teskd sweep FILE --launcher slurm``: one Slurm job per run, submitted as one array job by submitit.

Resources come from the sweep file's ``launcher:`` section, then ``--slurm KEY=VALUE`` (see RESOURCES); a
run of several GPUs or nodes runs one task per GPU as torch.distributed (:mod:`.slurm_job`). Every job is
``--requeue``-able and warned ``signal_delay_s`` before its time limit: it saves and is requeued."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import yaml

from teskd.errors import TeskdError
from teskd.launchers.local import train_argv
from teskd.launchers.state import SweepState

# key: what it is (the sweep file's `launcher:` section and --slurm KEY=VALUE)
RESOURCES = {
    "partition": "Slurm partition", "account": "account charged", "qos": "quality of service",
    "time": "time limit of one job in minutes (a longer run is requeued from its checkpoint)",
    "gpus_per_node": "GPUs of each run on each node (one task per GPU)", "nodes": "nodes of each run",
    "cpus_per_task": "CPU cores of each task", "mem_gb": "memory of each node in GB",
    "parallel": "most runs at once (the array's %N)", "signal_delay_s": "warning before the time limit (s)",
    "max_timeouts": "requeues after a time limit before giving up", "threads": "train.threads/OMP threads",
    "sbatch": "mapping of further sbatch options, e.g. {constraint: a100, exclude: node7}",
    "setup": "list of shell lines run before the job (module load ..., source venv/bin/activate)",
}
DEFAULTS = {"time": 240, "nodes": 1, "signal_delay_s": 120, "max_timeouts": 50, "parallel": 64}


def slurm_settings(sweep, launch) -> dict:
    settings = {**DEFAULTS, **sweep.launcher}
    if launch.gpus_per_run is not None:
        settings["gpus_per_node"] = launch.gpus_per_run
    for text in launch.slurm:
        key, sep, value = text.partition("=")
        if not sep:
            raise TeskdError(f"--slurm {text!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        if key.startswith("sbatch."):
            settings["sbatch"] = {**settings.get("sbatch", {}), key[len("sbatch."):]: value}
            continue
        settings[key] = yaml.safe_load(value)
    unknown = [k for k in settings if k not in RESOURCES]
    if unknown:
        raise TeskdError(f"Slurm launcher: unknown setting {unknown[0]!r}; known: {', '.join(RESOURCES)}")
    return settings


def make_executor(folder: Path, settings: dict, name: str):
    try:
        import submitit
    except ImportError as exc:
        raise TeskdError("--launcher slurm needs submitit: pip install 'teskd[cluster]'") from exc
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise TeskdError("--launcher slurm: sbatch/srun not found on PATH (run this on a Slurm login node)")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(settings["max_timeouts"]))
    gpus = int(settings.get("gpus_per_node") or 0)
    params = {"job_name": name, "time": int(settings["time"]), "nodes": int(settings["nodes"]),
              "ntasks_per_node": max(1, gpus), "signal_delay_s": int(settings["signal_delay_s"]),
              "array_parallelism": int(settings["parallel"]),
              "additional_parameters": {"requeue": True, **(settings.get("sbatch") or {})}}
    for key in ("partition", "account", "qos", "cpus_per_task", "setup"):
        if settings.get(key) is not None:
            params[key] = settings[key]
    if gpus:
        params["gpus_per_node"] = gpus
    if settings.get("mem_gb") is not None:
        params["mem"] = f"{int(settings['mem_gb'])}GB"
    executor.update_parameters(**params)
    return executor


def submit_sweep(sweep, runs, launch, say: Callable[[str], None] = print) -> list:
    """Submit the runs that are neither done, nor trained elsewhere, nor already queued; one array job."""
    from teskd.launchers.slurm_job import TrainJob
    from teskd.launchers.run_state import run_state

    settings = slurm_settings(sweep, launch)
    state = SweepState(sweep.out)
    jobs = scheduler_states([e.get("job") for e in state.runs.values() if e.get("launcher") == "slurm"])
    todo = []
    for run in runs:
        now = run_state(run, state.runs.get(run.name, {}), jobs)
        if now in ("done", "queued", "running") or now.startswith("locked"):
            say(f"{run.name}: {now}, not submitted")
        else:
            todo.append(run)
    if not todo:
        say(f"sweep {sweep.path}: nothing to submit")
        return []
    executor = make_executor(state.folder / "slurm", settings, f"teskd-{Path(sweep.path).stem}")
    cwd = str(Path.cwd())
    with executor.batch():
        submitted = [executor.submit(TrainJob(train_argv(r), cwd, int(settings.get("threads") or 0))) for r in todo]
    for run, job in zip(todo, submitted):
        state.record(run.name, launcher="slurm", job=job.job_id, log=str(job.paths.stdout))
        say(f"{run.name}: submitted as job {job.job_id} (log {job.paths.stdout})")
    runs = f"{len(todo)} run" + ("" if len(todo) == 1 else "s")
    say(f"sweep {sweep.path}: {runs} submitted; watch with `teskd sweep {sweep.path} --status`")
    return []


def scheduler_states(job_ids) -> dict[str, str]:
    """Job id -> Slurm state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...) from sacct; {} off Slurm."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return {}
    roots = sorted({j.split("_")[0] for j in ids})
    try:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", *(f"-j{j}" for j in roots)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.split()[0] if state.split() else "UNKNOWN"
    return states


def cancel_job(job_id: str, running: bool) -> None:
    """A running job: SIGTERM to its tasks (the run saves and stops); then ``scancel``."""
    try:
        if running:
            subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60, capture_output=True)
        else:
            subprocess.run(["scancel", job_id], check=True, timeout=60, capture_output=True)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise TeskdError(f"scancel {job_id} failed: {exc}") from exc
