"""``teskd sweep``: a grid of training runs from one YAML file, trained one after another in this process
(the default), or by a launcher (:mod:`teskd.launchers`: ``--launcher local --jobs N``, ``--launcher slurm``).

A sweep file::

    out: runs/reduced                  # parent of the run folders
    base: configs/cifar100/resnet18_ce.yaml   # the config of every run that names none
    overrides: [data.subset_per_class=100]    # key=value overrides of every run
    seeds: [0, 1]                      # optional; default: the config's own train.seed
    runs:                              # named variants, in this order
      ce: {}
      teskd: {config: configs/cifar100/resnet18_teskd.yaml, overrides: [method.detach_teacher=true]}
    grid:                              # optional: every combination, for every variant
      train.epochs: [15, 30]
    launcher: {partition: gpu, time: 240}   # optional: Slurm resources (teskd.launchers.slurm.RESOURCES)

Relative paths (``out``, ``base``, ``config``) are relative to the current directory, as in ``teskd train``.
Each run is ``<out>/<variant>[-<grid tag>...]-s<seed>``; runs go variant by variant, then grid combination
(the first grid key varying slowest), then seed. A run's overrides are, later ones winning: the common
``overrides``, the variant's ``overrides``, its grid values, then ``train.seed=<seed>``. Each run is trained
through the same code as ``teskd train CONFIG OVERRIDES --out RUN --resume RUN``: fresh when RUN has no
checkpoint, resumed otherwise; a run whose summary.json has the configured epochs is skipped unbuilt.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import math
import os
import re
import shlex
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from teskd import fileio, runfiles
from teskd.config import _short, load_config, parse_override, read_yaml, to_dict
from teskd.engine.rundir import CONFIG, METRICS, SUMMARY, RunDir
from teskd.engine.signals import Interrupted, stop_on_signals
from teskd.errors import TeskdError, one_line

SWEEP_KEYS = ("out", "base", "overrides", "seeds", "runs", "grid", "launcher")
VARIANT_KEYS = ("config", "overrides")
COLLECTED = (CONFIG, METRICS, SUMMARY)  # the small files --collect copies; never checkpoints
# The most runs one sweep file may plan: each is trained one after another, so more is a typo in the grid
# (the product of its value counts is computed before anything is expanded: 10**12 would not fit in memory).
MAX_PLANNED_RUNS = 10_000
# Grid tags: train.epochs=15 -> e15, model.width_mult=0.25 -> w0.25, model.arch=resnet34 -> resnet34; any
# other key -> <last part of the key>=<value> (the whole key where two grid keys share their last part).
SHORT_TAGS = {"train.epochs": "e", "model.width_mult": "w", "optim.lr": "lr", "optim.weight_decay": "wd",
              "data.batch_size": "bs", "data.subset_per_class": "spc", "model.arch": "", "data.dataset": "",
              "method.name": ""}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    variant: str
    grid: tuple  # ((key, value), ...)
    seed: int
    config: Path
    overrides: tuple  # key=value strings, in the order applied
    out: Path  # the run folder
    epochs: int  # train.epochs of the config the sweep builds

    def command(self) -> str:
        """The equivalent ``teskd train`` command line (run from the same directory)."""
        return shlex.join(["teskd", "train", str(self.config), *self.overrides,
                           "--out", str(self.out), "--resume", str(self.out)])


@dataclass(frozen=True)
class Sweep:
    path: Path
    out: Path
    runs: tuple  # PlannedRun, in running order
    launcher: dict = field(default_factory=dict)  # the file's `launcher:` section (Slurm resources), unchecked


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


# --- the sweep file -------------------------------------------------------------------------------------

def override_text(key: str, value: Any) -> str:
    """``key=value`` that the override parser reads back as ``value`` (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):  # a plain scalar's document end marker
        text = text[: -len("\n...")].strip()
    return f"{key}={text}"


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "_".join(map(_tag_value, value))
    if isinstance(value, dict):
        return "_".join(f"{k}{_tag_value(v)}" for k, v in value.items())
    return str(value)


def grid_tag(key: str, value: Any, keys: list[str]) -> str:
    """The part of a run name for one grid value (see ``SHORT_TAGS``), made safe for a folder name."""
    if key in SHORT_TAGS:
        tag = f"{SHORT_TAGS[key]}{_tag_value(value)}"
    else:
        leaf = key.rsplit(".", 1)[-1]
        name = leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in keys) == 1 else key
        tag = f"{name}={_tag_value(value)}"
    return _TAG_UNSAFE.sub("_", tag).strip("_") or "_"


def _read_yaml(path: Path) -> Any:
    if path.exists() and not path.is_file():
        raise TeskdError(f"sweep file {path} is not a file")
    return read_yaml(path, "sweep file", fileio.RUN_FILE_LIMIT)


def _string_list(value: Any, what: str, fail: Callable[[str], TeskdError]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(f"{what} must be a list of key=value strings, e.g. [train.epochs=30], got {_short(value)}")
    for text in value:
        try:
            parse_override(text)
        except TeskdError as exc:
            raise fail(f"{what}: {exc}") from exc
    return list(value)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _sets_seed(overrides: list[str]) -> bool:
    return any(text.split("=", 1)[0].strip() == "train.seed" for text in overrides)


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a whole sweep file, building every run's config with the normal config loader;
    any problem is one TeskdError line naming the file (and the run)."""
    path = Path(path)

    def fail(message: str) -> TeskdError:
        return TeskdError(f"sweep file {path}: {message}")

    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise fail(f"expected a mapping with keys {', '.join(SWEEP_KEYS)}, got {_short(data)}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise fail(f"unknown key {_short(unknown[0])}; valid keys: {', '.join(SWEEP_KEYS)}")
    out = data.get("out")
    if not isinstance(out, str) or not out.strip():
        raise fail("'out' (the folder the run folders go into, e.g. out: runs/sweep) is missing or not a path")
    if Path(out).exists() and not Path(out).is_dir():
        raise fail(f"out: {out} is an existing file, not a folder")
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise fail(f"'base' must be a config file path, got {_short(base)}")
    common = _string_list(data.get("overrides"), "overrides", fail)

    seeds = data.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise fail(f"'seeds' must be a non-empty list of integers >= 0, e.g. [0, 1, 2], got {_short(seeds)}")
        if len(set(seeds)) < len(seeds):
            raise fail(f"'seeds' repeats a seed: {seeds}")
        if _sets_seed(common):
            raise fail("overrides set train.seed, and 'seeds' sets it too; give the seeds in 'seeds' only")

    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise fail(f"'grid' must be a mapping of config keys to lists of values, got {_short(grid)}")
    for key, values in grid.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise fail(f"grid key {_short(key)} is not a dotted config key such as train.epochs")
        if key == "train.seed":
            raise fail("grid key train.seed: give the seeds in 'seeds' instead")
        if not isinstance(values, list) or not values:
            raise fail(f"grid key {key}: expected a non-empty list of values, got {_short(values)}")
        for value in values:
            if parse_override(override_text(key, value))[1] != value:
                raise fail(f"grid key {key}: the value {_short(value)} cannot be written as an override")
    grid_keys = list(grid)
    variants = data.get("runs")
    if not isinstance(variants, dict) or not variants:
        raise fail("'runs' (named variants, e.g. runs: {ce: {}, teskd: {config: ...}}) is missing or empty")
    points, n_seeds = math.prod(len(v) for v in grid.values()), len(seeds or [None])
    planned = len(variants) * points * n_seeds
    if planned > MAX_PLANNED_RUNS:
        raise fail(f"it plans {planned:,} runs ({_count(len(variants), 'variant')} x "
                   f"{_count(points, 'grid combination')} x {_count(n_seeds, 'seed')}), more than the "
                   f"{MAX_PLANNED_RUNS:,} one sweep file may plan; split it into several sweep files")
    combos = [tuple(zip(grid_keys, values)) for values in itertools.product(*grid.values())]
    runs, names = [], {}
    for variant, spec in variants.items():
        if not isinstance(variant, str) or not _NAME.fullmatch(variant):
            raise fail(f"run name {_short(variant)} must be letters, digits, '.', '_' or '-' (a folder name)")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise fail(f"run {variant}: expected a mapping with {' and/or '.join(VARIANT_KEYS)}, got {_short(spec)}")
        bad = [k for k in spec if k not in VARIANT_KEYS]
        if bad:
            raise fail(f"run {variant}: unknown key {_short(bad[0])}; valid keys: {', '.join(VARIANT_KEYS)}")
        config = spec.get("config", base)
        if config is None:
            raise fail(f"run {variant} has no config, and the sweep has no 'base' config")
        if not isinstance(config, str):
            raise fail(f"run {variant}: config must be a file path, got {_short(config)}")
        own = _string_list(spec.get("overrides"), f"run {variant}: overrides", fail)
        if seeds is not None and _sets_seed(own):
            raise fail(f"run {variant}: its overrides set train.seed, and 'seeds' sets it too")
        for combo in combos:
            tags = [grid_tag(k, v, grid_keys) for k, v in combo]
            overrides = [*common, *own, *(override_text(k, v) for k, v in combo)]
            for seed in (seeds if seeds is not None else [None]):
                full = overrides + ([f"train.seed={seed}"] if seed is not None else [])
                try:
                    cfg = load_config(config, full)
                except TeskdError as exc:
                    raise fail(f"run {variant}: {exc}") from exc
                name = "-".join([variant, *tags, f"s{cfg.train.seed}"])
                if name in names:
                    raise fail(f"two runs are both named {name} ({names[name]} and {variant}, "
                               f"{dict(combo)}); give the variants or grid values distinct names")
                names[name] = f"{variant}, {dict(combo)}"
                runs.append(PlannedRun(name, variant, combo, cfg.train.seed, Path(config), tuple(full),
                                       Path(out) / name, cfg.train.epochs))
    launcher = data.get("launcher") or {}
    if not isinstance(launcher, dict):
        raise fail(f"'launcher' must be a mapping (e.g. launcher: {{partition: gpu, time: 240}}), got {_short(launcher)}")
    return Sweep(path, Path(out), tuple(runs), launcher)


def select(runs, pattern: str | None) -> list[PlannedRun]:
    """The runs whose name matches the fnmatch ``pattern`` (all without one); none matching is an error."""
    runs = list(runs)
    if pattern is None:
        return runs
    chosen = [r for r in runs if fnmatch.fnmatchcase(r.name, pattern)]
    if not chosen:
        shown = ", ".join(r.name for r in runs[:6]) + (", ..." if len(runs) > 6 else "")
        raise TeskdError(f"--only {pattern!r} matches none of the sweep's {len(runs)} runs ({shown})")
    return chosen


# --- one run --------------------------------------------------------------------------------------------

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
    from teskd.report import flatten, is_operational

    if not RunDir(run.out).config.is_file():
        return []
    try:
        saved, planned = (flatten(to_dict(c)) for c in (_saved_config(run), load_config(run.config, list(run.overrides))))
    except TeskdError:
        return []
    return [k for k in sorted(set(saved) | set(planned)) if not is_operational(k) and saved.get(k) != planned.get(k)]


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
