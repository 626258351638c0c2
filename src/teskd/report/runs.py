"""Reading run folders for the report: which folders a path names, and one run as a table row, its settings,
its epoch records and its branches.

A run without a (valid) summary.json, e.g. still running or killed, is read from metrics.jsonl and marked
unfinished; a damaged metrics.jsonl is a one-line error, except for a torn last line. The deployed network is
read under the run's own branch name (:func:`teskd.runfiles.run_deploy_branch`); the records of runs written
before the teacher -> deployed rename call it ``teacher`` and are renamed as they are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from teskd import runfiles
from teskd.engine.metrics import MetricsLog
from teskd.engine.rundir import CONFIG as CONFIG_NAME, METRICS, SUMMARY, RunDir
from teskd.errors import TeskdError, one_line
from teskd.config import dotted
from teskd.report.settings import with_defaults

SUMMARY_KEYS = ("method", "epochs", "deployed_top1_last", "deployed_top1_best", "selected_on")  # the table's


def _run_dir(path: Path) -> RunDir:
    run = RunDir(path)
    if not run.path.exists():
        raise TeskdError(f"no such run directory: {run.path}")
    if not run.path.is_dir():
        raise TeskdError(f"{run.path} is a file, not a run directory")
    if not run.summary.exists() and not run.metrics.exists():
        raise TeskdError(f"{run.path} is not a teskd run directory (it has no {SUMMARY} and no {METRICS})")
    return run


def evaluated(records: list[dict]) -> list[dict]:
    """The records of evaluated epochs (all of them unless the run used train.eval_every > 1)."""
    return [r for r in records if "test_acc" in r]


def _is_record(record: dict, branch: str | None) -> bool:
    """An epoch record with the deployed network's numbers (runfiles has checked the types); one without
    ``test_acc`` is an epoch that train.eval_every did not evaluate."""
    if "test_acc" not in record:
        return "train_loss" in record
    key = runfiles.deployed_key(record, branch)
    return all(key in record[k] for k in ("test_acc", "val_acc") if k in record)


def read_metrics(run: RunDir, notes: list[str], branch: str | None, method: str = "?") -> list[dict]:
    """The epoch records, the deployed network under ``branch`` in each (see the module docstring); a torn last
    line is dropped with a note, any other bad line is a TeskdError. ``branch`` None: the run's method
    (``method``) is not registered here and no summary.json names its branch."""
    path = run.metrics
    unknown = branch is None and _names_no_legacy_branch(path)
    if unknown:  # a new run of a plug-in that is not loaded: its records are fine, its deployed branch unknown
        raise TeskdError(f"{path} does not say which of its branches is deployed: its method {method!r} is not "
                         f"registered here and the run has no {SUMMARY} yet (load the method's plug-in with "
                         f"TESKD_PLUGINS=module)")
    records = MetricsLog(path).read(check=lambda r: _is_record(r, branch),
                                    on_torn=lambda n: notes.append(f"ignored the incomplete last line ({n}) of {path}"))
    if not evaluated(records):
        raise TeskdError(f"{path} holds no finished epoch (the run has not finished its first epoch, "
                         f"or the file was emptied)")
    return [runfiles.with_deployed_branch(r, branch) for r in records]


def _names_no_legacy_branch(path: Path) -> bool:
    """Whether the evaluated records of ``path`` (read leniently) lack the old name ``teacher``."""
    try:
        records = evaluated(MetricsLog(path).read(on_torn=lambda n: None))
    except TeskdError:  # damaged: the strict read says where
        return False
    return bool(records) and not all(runfiles.LEGACY_BRANCH in r["test_acc"] for r in records)


@dataclass
class RunRow:
    method: str
    epochs: str
    top1_last: float
    top1_best: float
    selected_on: str
    params_train: int | None = None
    params_deploy: int | None = None
    images_per_sec: float | None = None
    finished: bool = True
    notes: list[str] = field(default_factory=list)


def _method_and_planned(run: RunDir) -> tuple[str, int | str]:
    """The method name and planned epochs of config.yaml; "?" where it is missing or unreadable (noted by
    :func:`_read_config`)."""
    try:
        cfg = runfiles.read_config_yaml(run)
        return str(cfg["method"]["name"]), int(cfg["train"]["epochs"])
    except Exception:  # noqa: BLE001  (TeskdError, a missing key, a section that is not a mapping)
        return "?", "?"


def _row_from_metrics(run: RunDir, records: list[dict], branch: str, notes: list[str]) -> RunRow:
    method, planned = _method_and_planned(run)
    done, records = records[-1]["epoch"], evaluated(records)
    tested = records[-1]["epoch"]  # before ``done`` when the run evaluates every few epochs
    epochs = f"{done}/{planned} unfinished" + (f" (top-1 of epoch {tested})" if tested != done else "")
    selected_on = "val" if all("val_acc" in r for r in records) else "test"
    scores = [r[f"{selected_on}_acc"][branch] for r in records]
    best = records[scores.index(max(scores))]  # the first maximum, as training selects it
    seconds = [r.get("epoch_seconds") for r in records]
    rates = [r.get("train_images_per_sec") for r in records]
    ips = (sum(s * v for s, v in zip(seconds, rates)) / sum(seconds)  # images / seconds over all epochs
           if all(isinstance(v, (int, float)) for v in seconds + rates) and sum(seconds) > 0 else None)
    return RunRow(method, epochs, records[-1]["test_acc"][branch],
                  best["test_acc"][branch], selected_on, images_per_sec=ips, finished=False, notes=notes)


def _row_from_summary(summary: dict, notes: list[str]) -> RunRow:
    return RunRow(str(summary["method"]), str(summary["epochs"]), float(summary["deployed_top1_last"]),
                  float(summary["deployed_top1_best"]), str(summary["selected_on"]), summary.get("params_train"),
                  summary.get("params_deploy"), summary.get("train_images_per_sec"), notes=notes)


def _read_summary(run: RunDir, notes: list[str]) -> dict | None:
    """summary.json when it is there and valid; a damaged one is noted (the run is then read from its
    metrics), or, without metrics to fall back on, one TeskdError line."""
    if not run.summary.exists():
        return None
    try:
        return runfiles.read_summary(run, SUMMARY_KEYS)
    except TeskdError as exc:
        if not os.path.lexists(run.metrics):
            raise TeskdError(f"{exc}, and {run.path} has no {METRICS} to report it from instead") from exc
        notes.append(f"{exc}; {run.path.name} is reported from {METRICS}")
        return None


@dataclass
class _Read:
    row: RunRow
    summary: dict | None  # when the row is from summary.json
    records: list[dict]
    branch: str  # the deployed network's name in records


def _read(run: RunDir) -> _Read:
    """The row of a run: from summary.json when the run finished, else from metrics.jsonl (unfinished)."""
    notes: list[str] = []
    summary = _read_summary(run, notes)
    method = summary["method"] if summary is not None else _method_and_planned(run)[0]
    named = runfiles.run_deploy_branch(summary, method)
    branch = named or runfiles.LEGACY_BRANCH  # unknown (a plug-in not loaded here): records name it teacher
    if summary is None:
        records = read_metrics(run, notes, named, method)
        return _Read(_row_from_metrics(run, records, branch, notes), None, records, branch)
    records = []
    if os.path.lexists(run.metrics):  # a finished run resumed for more epochs has an older summary.json
        try:
            records = read_metrics(run, notes, named, method)
        except TeskdError as exc:
            notes.append(f"{exc}; the row of {run.path.name} comes from {SUMMARY} alone")
        if records and records[-1]["epoch"] > summary["epochs"]:
            notes.append(f"{run.summary} is from epoch {summary['epochs']}, but {METRICS} goes on to epoch "
                         f"{records[-1]['epoch']}; {run.path.name} is reported from {METRICS}")
            return _Read(_row_from_metrics(run, records, branch, notes), None, records, branch)
    return _Read(_row_from_summary(summary, notes), summary, records, branch)


@dataclass
class RunInfo:
    """One run as the grouped report sees it."""

    path: Path
    row: RunRow
    config: dict  # flattened config.yaml; {} when it is missing or unreadable (noted)
    summary: dict | None  # when the row is from summary.json
    records: list[dict]  # the deployed network under ``branch``
    done: int  # epochs finished
    total: int | None  # epochs configured
    branches: dict[str, float]  # every branch's last test top-1
    branch: str = runfiles.LEGACY_BRANCH  # the deployed network's name in records and branches

    @property
    def seed(self):
        return self.config.get("train.seed")

    @property
    def unfinished(self) -> bool:
        return not self.row.finished or (self.total is not None and self.done < self.total)

    @property
    def train_last(self) -> float | None:
        """The deployed network's training top-1 (%) in its last logged epoch (mean over the epoch's augmented
        batches, in train mode): beside the test top-1 it tells fitting from generalising."""
        last = self.records[-1].get("train_acc") if self.records else None
        value = last.get(self.branch) if isinstance(last, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_config(run: RunDir, notes: list[str]) -> dict:
    if not run.config.is_file():
        notes.append(f"{run.path} has no {CONFIG_NAME}: its settings are unknown, so it is grouped by its "
                     f"{SUMMARY} alone")
        return {}
    try:
        data = runfiles.read_config_yaml(run)
    except TeskdError as exc:
        notes.append(f"{exc}: the settings of {run.path} are unknown")
        return {}
    return with_defaults(dotted(data))


def _numbers(d) -> dict[str, float]:
    return {str(k): float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(d, dict) else {}


def _last_branches(read: _Read) -> tuple[int, dict[str, float]]:
    """(epochs finished, every branch's last test top-1), from summary.json where the row is."""
    last = evaluated(read.records)[-1] if evaluated(read.records) else None
    if read.summary is None:
        return read.records[-1]["epoch"], _numbers(last["test_acc"])
    done = int(read.summary["epochs"])
    named = runfiles.with_deployed_branch({"test_acc": read.summary.get("test_acc_last")}, read.branch)
    branches = _numbers(named["test_acc"])
    if not branches and last is not None and last["epoch"] == done:
        branches = _numbers(last["test_acc"])
    return done, branches


def read_run(path: Path, notes: list[str]) -> RunInfo:
    """Everything the grouped report needs of one run (its table row, config, curves and branches)."""
    read = _read(_run_dir(path))
    notes += read.row.notes
    run = RunDir(path)
    config = _read_config(run, notes)
    done, branches = _last_branches(read)
    planned = config.get("train.epochs")
    total = planned if isinstance(planned, int) and not isinstance(planned, bool) else (
        done if read.summary is not None else None)
    return RunInfo(Path(path), read.row, config, read.summary, read.records, done, total,
                   branches or {read.branch: read.row.top1_last}, read.branch)


# --- which folders a path names ----------------------------------------------------------------------------

def _has_run_files(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (CONFIG_NAME, SUMMARY, METRICS))


def _runs_below(path: Path) -> list[Path]:
    """Folders holding a config.yaml one or two levels below ``path``, in name order."""
    def subdirs(p: Path) -> list[Path]:
        return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))

    try:
        found = []
        for child in subdirs(path):
            if (child / CONFIG_NAME).is_file():
                found.append(child)
            else:
                found += [g for g in subdirs(child) if (g / CONFIG_NAME).is_file()]
        return found
    except OSError as exc:
        raise TeskdError(f"cannot list {path} ({one_line(exc, 200)})") from exc


def _not_started(run: Path) -> bool:
    rd = RunDir(run)
    return not rd.summary.exists() and not MetricsLog(rd.metrics).read(on_torn=lambda n: None)


def _runs_in(path: Path, notes: list[str]) -> list[Path]:
    """The run ``path`` is, or the started runs in the folder ``path`` (see :func:`find_runs`)."""
    if _has_run_files(path) or not path.is_dir():
        return [_run_dir(path).path]
    below = _runs_below(path)
    if not below:
        raise TeskdError(f"{path} is not a teskd run directory (it has no {SUMMARY} and no {METRICS}), "
                         f"and no folder one or two levels below it holds a run ({CONFIG_NAME})")
    runs = []
    for run in below:
        if _not_started(run):
            notes.append(f"left out {run}: it has not finished an epoch yet")
        else:
            runs.append(run)
    return runs


def find_runs(paths: list[Path], notes: list[str]) -> list[Path]:
    """The run folders that ``paths`` name: each is a run folder, or a folder of run folders (those with a
    config.yaml one or two levels below it, in name order; one of them that has not finished an epoch yet
    is left out with a note). Anything else is a one-line error naming the path. Each run is listed once."""
    found, seen = [], set()
    for path in map(Path, paths):
        for run in _runs_in(path, notes):
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    if not found:
        raise TeskdError(f"no run in {', '.join(map(str, paths))} has finished an epoch yet; nothing to report")
    return found
