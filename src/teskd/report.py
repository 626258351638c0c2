"""``teskd report``: a table of runs (finished or not) and their training curves.

A run without a (valid) summary.json, e.g. still running or killed, is reported from metrics.jsonl
and marked unfinished; a damaged metrics.jsonl is a one-line error, except for a torn last line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from teskd import runfiles
from teskd.curves import plot_text
from teskd.engine.metrics import MetricsLog
from teskd.engine.rundir import CONFIG as CONFIG_NAME, METRICS, SUMMARY, RunDir
from teskd.errors import TeskdError, one_line, printable


def _run_dir(path: Path) -> RunDir:
    run = RunDir(path)
    if not run.path.exists():
        raise TeskdError(f"no such run directory: {run.path}")
    if not run.path.is_dir():
        raise TeskdError(f"{run.path} is a file, not a run directory")
    if not run.summary.exists() and not run.metrics.exists():
        raise TeskdError(f"{run.path} is not a teskd run directory (it has no {SUMMARY} and no {METRICS})")
    return run


SUMMARY_KEYS = ("method", "epochs", "teacher_top1_last", "teacher_top1_best", "selected_on")  # what the table needs


def read_summary(run: RunDir) -> dict:
    """summary.json, its fields checked (:mod:`teskd.runfiles`); a damaged one is one TeskdError line."""
    return runfiles.read_summary(run, SUMMARY_KEYS)


def _is_record(r: dict) -> bool:
    """An epoch record with the deployed network's numbers (runfiles has checked the types); one without
    ``test_acc`` is an epoch that train.eval_every did not evaluate."""
    if "test_acc" not in r:
        return "train_loss" in r
    return all("teacher" in r[key] for key in ("test_acc", "val_acc") if key in r)


def evaluated(records: list[dict]) -> list[dict]:
    """The records of evaluated epochs (all of them unless the run used train.eval_every > 1)."""
    return [r for r in records if "test_acc" in r]


def read_metrics(run: RunDir, notes: list[str]) -> list[dict]:
    """The epoch records; a torn last line is dropped with a note, any other bad line is a TeskdError."""
    path = run.metrics
    records = MetricsLog(path).read(
        check=_is_record, on_torn=lambda n: notes.append(f"ignored the incomplete last line ({n}) of {path}"))
    if not evaluated(records):
        raise TeskdError(f"{path} holds no finished epoch (the run has not finished its first epoch, "
                         f"or the file was emptied)")
    return records


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


def _row_from_metrics(run: RunDir, records: list[dict], notes: list[str]) -> RunRow:
    try:  # the table shows "?" where the config is missing or unreadable (read_run notes why)
        cfg = runfiles.read_config_yaml(run)
        method, planned = str(cfg["method"]["name"]), int(cfg["train"]["epochs"])
    except Exception:  # noqa: BLE001  (TeskdError, a missing key, a section that is not a mapping)
        method, planned = "?", "?"
    records = evaluated(records)
    selected_on = "val" if all("val_acc" in r for r in records) else "test"
    scores = [r[f"{selected_on}_acc"]["teacher"] for r in records]
    best = records[scores.index(max(scores))]  # the first maximum, as training selects it
    seconds = [r.get("epoch_seconds") for r in records]
    rates = [r.get("train_images_per_sec") for r in records]
    ips = (sum(s * v for s, v in zip(seconds, rates)) / sum(seconds)  # images / seconds over all epochs
           if all(isinstance(v, (int, float)) for v in seconds + rates) and sum(seconds) > 0 else None)
    return RunRow(method, f"{records[-1]['epoch']}/{planned} unfinished",
                  records[-1]["test_acc"]["teacher"], best["test_acc"]["teacher"], selected_on,
                  images_per_sec=ips, finished=False, notes=notes)


def run_row(run_dir: Path) -> RunRow:
    """One table row: from summary.json when the run finished, else from metrics.jsonl (unfinished)."""
    run = _run_dir(run_dir)
    notes: list[str] = []
    summary = None
    if run.summary.exists():
        try:
            summary = read_summary(run)
        except TeskdError as exc:
            if not os.path.lexists(run.metrics):
                raise TeskdError(f"{exc}, and {run.path} has no {METRICS} to report it from instead") from exc
            notes.append(f"{exc}; {run.path.name} is reported from {METRICS}")
    if summary is None:
        return _row_from_metrics(run, read_metrics(run, notes), notes)
    if os.path.lexists(run.metrics):  # a finished run resumed for more epochs has an older summary.json
        try:
            records = read_metrics(run, notes)
        except TeskdError as exc:
            notes.append(f"{exc}; the row of {run.path.name} comes from {SUMMARY} alone")
            records = []
        if records and records[-1]["epoch"] > summary["epochs"]:
            notes.append(f"{run.summary} is from epoch {summary['epochs']}, but {METRICS} goes on to epoch "
                         f"{records[-1]['epoch']}; {run.path.name} is reported from {METRICS}")
            return _row_from_metrics(run, records, notes)
    return RunRow(str(summary["method"]), str(summary["epochs"]), float(summary["teacher_top1_last"]),
                  float(summary["teacher_top1_best"]), str(summary["selected_on"]), summary.get("params_train"),
                  summary.get("params_deploy"), summary.get("train_images_per_sec"), notes=notes)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short names for runs: the folder name, or parent/name where names repeat."""
    names = [Path(r).name or str(r) for r in run_dirs]
    return names if len(set(names)) == len(names) else [str(Path(*Path(r).resolve().parts[-2:])) for r in run_dirs]


def summary_table(run_dirs: list[Path]) -> str:
    """The comparison table of ``run_dirs``, then a ``note:`` line for anything unusual."""
    rows_ = [run_row(r) for r in run_dirs]
    return "\n".join(_run_table(_labels(run_dirs), rows_) + [f"note: {printable(n)}" for r in rows_ for n in r.notes])


def _run_table(labels: list[str], rows_: list[RunRow]) -> list[str]:
    """One line per run (and the ``unfinished:`` legend when needed); no notes. Names from run folders are
    printed with their control characters escaped."""

    def num(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"

    rows = [("run", "method", "epochs", "top-1 last", "top-1 best", "selected on", "params train",
             "params deploy", "img/s")]
    for label, r in zip(labels, rows_):
        rows.append((printable(label), printable(r.method), printable(r.epochs), f"{r.top1_last:.2f}",
                     f"{r.top1_best:.2f}", printable(r.selected_on), num(r.params_train, ","),
                     num(r.params_deploy, ","), num(r.images_per_sec, ".0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(not r.finished for r in rows_):
        lines.append(f"unfinished: no {SUMMARY} yet (still running, stopped or killed); numbers are from "
                     f"{METRICS} up to the last finished epoch")
    return lines


@dataclass
class Series:
    label: str
    epochs: list[int]
    values: list[float]
    dashed: bool = False


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series]


LOSS_NOTE = ("No loss is plotted: a TESKD run logs 0.2 x the cross-entropy summed over all 4 branches plus the "
             "KD and feature terms, not the teacher's own cross-entropy, so its loss is not comparable with "
             "a CE run's.")


def _series(label: str, records: list[dict], key: str, branch: str = "teacher", dashed: bool = False):
    points = [(r["epoch"], (r.get(key) or {}).get(branch)) for r in records]
    points = [(e, float(v)) for e, v in points if isinstance(v, (int, float))]
    return Series(label, [e for e, _ in points], [v for _, v in points], dashed) if points else None


def curve_panels(run_dirs: list[Path]) -> list[Panel]:
    """The teacher's test top-1 (validation dashed) and training top-1, comparable across methods,
    then, for runs with students (TESKD), every branch's test top-1."""
    return panels_of([(label, read_metrics(RunDir(r), [])) for label, r in zip(_labels(run_dirs), run_dirs)])


def panels_of(runs: list[tuple[str, list[dict]]]) -> list[Panel]:
    """``curve_panels`` of (label, epoch records) pairs: runs, or groups' mean records."""
    runs = [(label, evaluated(records)) for label, records in runs]
    multi = [(label, records) for label, records in runs if len({b for r in records for b in r["test_acc"]}) > 1]
    test, train, branches = [], [], []
    for label, records in runs:
        test.append(_series(label, records, "test_acc"))
        if all("val_acc" in r for r in records):
            test.append(_series(f"{label} (val)", records, "val_acc", dashed=True))
        train.append(_series(label, records, "train_acc"))
    for label, records in multi:
        for name in dict.fromkeys(b for r in records for b in r["test_acc"]):
            branches.append(_series(f"{label}: {name}" if len(multi) > 1 else name, records, "test_acc", name))
    panels = [Panel("deployed network (teacher): test top-1", "top-1 (%)", test),
              Panel("teacher: training top-1 (same quantity for every method)",
                    "train top-1 (%), mean over the epoch's augmented batches", train)]
    if multi:
        panels.append(Panel(f"every branch: test top-1 ({', '.join(label for label, _ in multi)})", "top-1 (%)",
                            branches))
    for panel in panels:
        panel.series = [s for s in panel.series if s]
    return panels


def _draw_panel(ax, panel: Panel) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    for s in panel.series:
        ax.plot(s.epochs, s.values, marker="o", ms=3, ls="--" if s.dashed else "-", label=plot_text(s.label))
    ax.set_title(plot_text(panel.title), fontsize=10)
    ax.set(xlabel="epoch", ylabel=panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.series:
        _legend_for(ax, len(panel.series))


def _legend_for(ax, entries: int) -> None:
    """Inside the axis for a few entries; below it, in two columns, for many (the layout makes room)."""
    if entries <= 8:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def draw_panels(panels: list[Panel]):
    """A matplotlib figure with one axis per panel (not pyplot's: nothing is shown, nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(panels), 4.4))
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_panel(ax, panel)
    fig.text(0.01, 0.01, LOSS_NOTE, fontsize=7.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_path(out: Path) -> Path:
    """Where ``--plot OUT`` writes: OUT itself when it ends in .png, else OUT with .png appended."""
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out.with_name(out.name + ".png")


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the report figure (``draw_report``) of the runs' groups into a PNG; returns the path written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TeskdError("teskd report --plot needs matplotlib: pip install 'teskd[plot]'") from exc
    out = plot_path(out)
    fig = draw_report(group_runs([read_run(r, []) for r in run_dirs]))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, format="png", bbox_inches="tight")
    except OSError as exc:
        raise TeskdError(f"cannot write the plot {out} ({one_line(exc, 200)})") from exc
    return out


# --- groups of runs: the seeds of one setting ------------------------------------------------------

# Keys that never split runs into groups: the seed (a group's runs are its seeds) and settings that change
# where or how fast a run goes, not what it computes.
OPERATIONAL_KEYS = frozenset({"train.seed", "data.root", "train.threads", "train.progress", "train.device",
                              "data.workers", "data.eval_batch_size", "train.tensorboard"})
OPERATIONAL_PREFIXES = ("train.checkpoint_",)
OWN_COLUMNS = ("data.dataset", "model.arch", "model.width_mult", "method.name")  # shown in columns of their own
_UNSET = object()  # a key one run's config.yaml lacks


def is_operational(key: str) -> bool:
    return key in OPERATIONAL_KEYS or key.startswith(OPERATIONAL_PREFIXES)


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the dotted keys of ``key=value`` overrides)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def render_value(value) -> str:
    """A setting's value as it would be written in an override (``true``, ``null``, ``[100,150]``)."""
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


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
    return not rd.summary.exists() and not MetricsLog(rd.metrics).read(check=_is_record, on_torn=lambda n: None)


def find_runs(paths: list[Path], notes: list[str]) -> list[Path]:
    """The run folders that ``paths`` name: each is a run folder, or a folder of run folders (those with a
    config.yaml one or two levels below it, in name order; one of them that has not finished an epoch yet
    is left out with a note). Anything else is a one-line error naming the path. Each run is listed once."""
    found, seen = [], set()
    for path in map(Path, paths):
        if _has_run_files(path) or not path.is_dir():
            runs = [_run_dir(path).path]
        else:
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
        for run in runs:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    if not found:
        raise TeskdError(f"no run in {', '.join(map(str, paths))} has finished an epoch yet; nothing to report")
    return found


@dataclass
class RunInfo:
    """One run as the grouped report sees it."""

    path: Path
    row: RunRow
    config: dict  # flattened config.yaml; {} when it is missing or unreadable (noted)
    summary: dict | None  # when the row is from summary.json
    records: list[dict]
    done: int  # epochs finished
    total: int | None  # epochs configured
    branches: dict[str, float]  # every branch's last test top-1

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
        value = last.get("teacher") if isinstance(last, dict) else None
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
    return _with_defaults(flatten(data))


def _with_defaults(flat: dict) -> dict:
    """The settings with today's defaults filled in: a config.yaml written by an older teskd lacks the settings
    added since, which had their default value (so they do not count as differing)."""
    from teskd.config import load_config, to_dict

    try:
        defaults = flatten(to_dict(load_config(None, [f"method.name={flat.get('method.name', 'teskd')}"])))
    except TeskdError:  # a method of a plug-in that is not loaded: fill in the non-method settings only
        defaults = {k: v for k, v in flatten(to_dict(load_config(None, []))).items() if not k.startswith("method.")}
    return {**defaults, **flat}


def _numbers(d) -> dict[str, float]:
    return {str(k): float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(d, dict) else {}


def read_run(path: Path, notes: list[str]) -> RunInfo:
    """Everything the grouped report needs of one run (its table row, config, curves and branches)."""
    row = run_row(path)
    notes += row.notes
    run = RunDir(path)
    config = _read_config(run, notes)
    records = []
    if os.path.lexists(run.metrics):
        with contextlib.suppress(TeskdError):  # already noted by run_row
            records = read_metrics(run, [])
    summary = read_summary(run) if row.finished else None
    if summary is not None:
        done = int(summary["epochs"])
        branches = _numbers(summary.get("test_acc_last"))
        if not branches and evaluated(records) and evaluated(records)[-1]["epoch"] == done:
            branches = _numbers(evaluated(records)[-1]["test_acc"])
    else:
        done, branches = records[-1]["epoch"], _numbers(evaluated(records)[-1]["test_acc"])
    planned = config.get("train.epochs")
    total = planned if isinstance(planned, int) and not isinstance(planned, bool) else (
        done if summary is not None else None)
    return RunInfo(Path(path), row, config, summary, records, done, total, branches or {"teacher": row.top1_last})


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    return statistics.fmean(values) if values else None


def _std(values: list) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Group:
    """Runs with the same settings apart from their seed (and operational keys)."""

    dataset: str
    arch: str
    width_mult: str
    method: str
    common: tuple  # ((key, value), ...): settings that differ between the runs reported
    method_settings: tuple  # the same among runs of this method (method.* keys)
    runs: list[RunInfo]
    ce: "Group | None" = None  # the CE group with the same dataset, arch, width and common settings

    @property
    def settings(self) -> str:
        return " ".join(f"{k}={render_value(v)}" for k, v in (*self.common, *self.method_settings))

    @property
    def counted(self) -> list[RunInfo]:
        """The runs the statistics use: the finished ones, or, while none has finished, the unfinished ones
        (up to their last finished epoch); a mean never mixes a finished seed with one stopped halfway."""
        return [r for r in self.runs if not r.unfinished] or self.runs

    @property
    def last(self) -> list[float]:
        return [r.row.top1_last for r in self.counted]

    @property
    def best(self) -> list[float]:
        return [r.row.top1_best for r in self.counted]

    @property
    def finished(self) -> bool:
        return any(not r.unfinished for r in self.runs)

    @property
    def delta_vs_ce(self) -> float | None:
        """None unless both groups have a finished seed (a run stopped halfway is not a result to compare)."""
        if self.ce is None or not (self.finished and self.ce.finished):
            return None
        return _mean(self.last) - _mean(self.ce.last)

    def paired_deltas(self) -> list[float]:
        """Last top-1 minus CE's, seed by seed, over the seeds both groups finished (a paired difference: the
        seed's data order and initialisation are shared, so their noise partly cancels)."""
        if self.ce is None:
            return []
        ce = {r.seed: r.row.top1_last for r in self.ce.runs if not r.unfinished}
        return [r.row.top1_last - ce[r.seed] for r in self.runs if not r.unfinished and r.seed in ce]

    @property
    def epochs(self) -> str:
        """``done/total`` of each seed (``*``: unfinished), one entry when all agree."""
        each = [f"{r.done}/{r.total if r.total is not None else '?'}" + ("*" if r.unfinished else "")
                for r in self.runs]
        return each[0] if len(set(each)) == 1 else ",".join(each)

    def first(self, get):
        return next((v for v in map(get, self.runs) if v is not None), None)

    def branch_means(self) -> dict[str, float]:
        names = dict.fromkeys(b for r in self.counted for b in r.branches)
        return {b: _mean([r.branches.get(b) for r in self.counted]) for b in names}

    def as_dict(self) -> dict:
        """The group as plain data (``--format json``; csv flattens it)."""
        summary = lambda key: self.first(lambda r: (r.summary or {}).get(key))  # noqa: E731
        return _finite({
            "dataset": self.dataset, "arch": self.arch, "width_mult": _maybe_number(self.width_mult),
            "method": self.method, "settings": self.settings,
            "settings_dict": {k: v for k, v in (*self.common, *self.method_settings) if v is not _UNSET},
            "n": len(self.counted), "seeds": [r.seed for r in self.counted], "epochs": self.epochs,
            "unfinished": sum(r.unfinished for r in self.runs),
            "top1_last_mean": _mean(self.last), "top1_last_std": _std(self.last),
            "top1_best_mean": _mean(self.best), "top1_best_std": _std(self.best),
            "delta_vs_ce": self.delta_vs_ce,
            "delta_paired_mean": _mean(self.paired_deltas()), "delta_paired_std": _std(self.paired_deltas()),
            "delta_paired_n": len(self.paired_deltas()),
            "train_top1_last_mean": _mean([r.train_last for r in self.counted]),
            "test_acc_last_mean": self.branch_means(),
            "train_images_per_sec": _mean([r.row.images_per_sec for r in self.counted]),
            "params_train": self.first(lambda r: r.row.params_train),
            "params_deploy": self.first(lambda r: r.row.params_deploy),
            "macs_train": summary("macs_train"), "macs_deploy": summary("macs_deploy"),
            "run_dirs": [str(r.path) for r in self.runs],
            "runs": [{"dir": str(r.path), "seed": r.seed, "epochs_done": r.done, "epochs_total": r.total,
                      "finished": not r.unfinished, "top1_last": r.row.top1_last, "top1_best": r.row.top1_best,
                      "selected_on": r.row.selected_on, "test_acc_last": r.branches, "train_top1_last": r.train_last,
                      "train_images_per_sec": r.row.images_per_sec} for r in self.runs],
        })


def _maybe_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value):
    """NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _identity(r: RunInfo) -> tuple[str, str, str, str]:
    s, c = r.summary or {}, r.config
    width = c.get("model.width_mult")
    return (str(c.get("data.dataset") or s.get("dataset") or "?"), str(c.get("model.arch") or s.get("arch") or "?"),
            format(width, "g") if isinstance(width, (int, float)) else "?", str(c.get("method.name") or r.row.method))


def _differing(configs: list[dict], keys: list[str]) -> list[str]:
    return [k for k in keys if len({render_value(c.get(k, _UNSET)) for c in configs}) > 1]


def group_runs(runs: list[RunInfo], notes: list[str] | None = None) -> list[Group]:
    """Group the runs by dataset, arch, width, method and every other setting that differs between them
    (method.* settings compared among runs of the same method), apart from the seed and operational keys.
    Sorted by dataset, arch, width, settings, then method (ce first); each non-CE group is linked to the CE
    group with the same dataset, arch, width and non-method settings."""
    idents = [_identity(r) for r in runs]
    keys = sorted({k for r in runs for k in r.config if k not in OWN_COLUMNS and not is_operational(k)})
    common_keys = _differing([r.config for r in runs], [k for k in keys if not k.startswith("method.")])
    method_keys = {m: _differing([r.config for r, i in zip(runs, idents) if i[3] == m],
                                 [k for k in keys if k.startswith("method.")]) for m in {i[3] for i in idents}}
    buckets: dict[tuple, Group] = {}
    for r, ident in zip(runs, idents):
        common = tuple((k, r.config.get(k, _UNSET)) for k in common_keys)
        own = tuple((k, r.config.get(k, _UNSET)) for k in method_keys[ident[3]])
        key = (*ident, tuple((k, render_value(v)) for k, v in common), tuple((k, render_value(v)) for k, v in own))
        buckets.setdefault(key, Group(*ident, common, own, [])).runs.append(r)
    groups = list(buckets.values())
    for g in groups:
        g.runs.sort(key=lambda r: (not isinstance(r.seed, int), r.seed if isinstance(r.seed, int) else 0,
                                   str(r.seed), str(r.path)))
        seeds = [str(r.seed) for r in g.runs]
        if notes is not None and len(set(seeds)) < len(seeds):
            notes.append(f"the runs {', '.join(str(r.path) for r in g.runs)} have the same settings and repeat a "
                         f"seed ({', '.join(seeds)}); each is counted as a seed of its own")

    def comparable(g: Group) -> tuple:
        return g.dataset, g.arch, g.width_mult, tuple((k, render_value(v)) for k, v in g.common)

    ce = {}
    for g in groups:
        if g.method == "ce":
            ce.setdefault(comparable(g), []).append(g)
    for g in groups:
        matches = ce.get(comparable(g), [])
        if g.method != "ce" and len(matches) == 1:
            g.ce = matches[0]
    groups.sort(key=lambda g: (g.dataset, g.arch, _maybe_width(g.width_mult),
                               " ".join(f"{k}={render_value(v)}" for k, v in g.common),
                               g.method != "ce", g.method, g.settings))
    return groups


def _maybe_width(text: str) -> tuple:
    value = _maybe_number(text)
    return (0, value, "") if isinstance(value, float) else (1, 0.0, text)


DASH = "\u2014"  # an em dash: no value
GROUP_COLUMNS = ("dataset", "arch", "width", "method", "settings", "n", "epochs", "top-1 last", "top-1 best",
                 "\u0394 vs CE", "\u0394 paired", "train top-1", "img/s", "params train", "params deploy", "MACs train", "MACs deploy",
                 "branches (last top-1)")
_LEFT = {"dataset", "arch", "method", "settings", "epochs", "branches (last top-1)"}
CSV_COLUMNS = ("dataset", "arch", "width_mult", "method", "settings", "n", "seeds", "epochs", "unfinished",
               "top1_last_mean", "top1_last_std", "top1_best_mean", "top1_best_std", "delta_vs_ce",
               "delta_paired_mean", "delta_paired_std", "delta_paired_n", "train_top1_last_mean",
               "train_images_per_sec", "params_train", "params_deploy", "macs_train", "macs_deploy", "run_dirs")


def _pm(mean: float | None, std: float | None) -> str:
    return DASH if mean is None else f"{mean:.2f} \u00b1 " + (DASH if std is None else f"{std:.2f}")


def _group_cells(g: Group) -> list[str]:
    d = g.as_dict()

    def count(v):
        return DASH if v is None else f"{v:,}"

    def macs(v):
        return "not measured" if v is None else f"{v / 1e6:,.1f}M"

    branches = d["test_acc_last_mean"]
    cells = [g.dataset, g.arch, g.width_mult, g.method, g.settings or DASH, str(d["n"]), d["epochs"],
             _pm(d["top1_last_mean"], d["top1_last_std"]), _pm(d["top1_best_mean"], d["top1_best_std"]),
             DASH if d["delta_vs_ce"] is None else f"{d['delta_vs_ce']:+.2f}",
             DASH if d["delta_paired_mean"] is None else
             f"{d['delta_paired_mean']:+.2f} \u00b1 " + (DASH if d["delta_paired_std"] is None else
                                                       f"{d['delta_paired_std']:.2f}") + f" ({d['delta_paired_n']})",
             DASH if d["train_top1_last_mean"] is None else f"{d['train_top1_last_mean']:.2f}",
             DASH if d["train_images_per_sec"] is None else f"{d['train_images_per_sec']:,.0f}",
             count(d["params_train"]), count(d["params_deploy"]), macs(d["macs_train"]), macs(d["macs_deploy"]),
             " ".join(f"{b}={v:.2f}" for b, v in branches.items()) if len(branches) > 1 else DASH]
    return [printable(c) for c in cells]  # names and settings come from run folders


def _legend(groups: list[Group]) -> list[str]:
    lines = [f"top-1: the deployed network's test top-1 (%), mean \u00b1 sample std over the group's seeds "
             f"(best: the epoch selected on val, or on test without val); \u0394 vs CE: mean last top-1 minus "
             f"that of the ce group with the same dataset, arch, width and settings; \u0394 paired: per-seed "
             f"difference from that group's run of the same seed, mean \u00b1 sample std (number of pairs); train "
             f"top-1: the deployed network's training top-1 in the last epoch (augmented batches, train mode)"]
    if any(r.unfinished for g in groups for r in g.runs):
        lines.append(f"*: unfinished run; a group's numbers use its finished seeds only (n), or, while none has "
                     f"finished, its unfinished ones up to their last finished epoch (from {METRICS})")
    return lines


def group_table(groups: list[Group]) -> list[str]:
    rows = [list(GROUP_COLUMNS)] + [_group_cells(g) for g in groups]
    widths = [max(len(r[i]) for r in rows) for i in range(len(GROUP_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if name in _LEFT else c.rjust(w) for c, w, name in zip(r, widths, GROUP_COLUMNS))
             .rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def group_markdown(groups: list[Group]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(GROUP_COLUMNS) + " |",
             "|" + "|".join(" --- " if name in _LEFT else " ---: " for name in GROUP_COLUMNS) + "|"]
    lines += ["| " + " | ".join(map(cell, _group_cells(g))) + " |" for g in groups]
    return lines


def group_csv(groups: list[Group]) -> str:
    dicts = [g.as_dict() for g in groups]
    branches = list(dict.fromkeys(b for d in dicts for b in d["test_acc_last_mean"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"last_{b}" for b in branches)])
    for d in dicts:
        row = {**d, "seeds": " ".join(map(str, d["seeds"])), "run_dirs": " ".join(d["run_dirs"])}
        writer.writerow([("" if row[c] is None else row[c]) for c in CSV_COLUMNS]
                        + [("" if d["test_acc_last_mean"].get(b) is None else d["test_acc_last_mean"][b])
                           for b in branches])
    return buf.getvalue().rstrip("\n")


FORMATS = ("table", "markdown", "csv", "json")


def format_report(run_dirs: list[Path], fmt: str = "table", notes: list[str] | None = None) -> tuple[str, list[str]]:
    """The report of ``run_dirs`` in ``fmt``: (text for stdout, notes not already in it). ``table``: the
    per-run table, then the groups; ``markdown``: the groups as a GitHub table; ``csv``: one row per group;
    ``json``: a list of group objects with their runs. Notes are part of table and markdown output."""
    if fmt not in FORMATS:
        raise TeskdError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    notes = list(notes or [])
    runs = [read_run(r, notes) for r in run_dirs]
    groups = group_runs(runs, notes)
    if fmt in ("csv", "json"):  # the formats escape their own strings; the notes go to the terminal
        text = group_csv(groups) if fmt == "csv" else json.dumps([g.as_dict() for g in groups], indent=2)
        return text, [printable(n) for n in notes]
    if fmt == "markdown":
        lines = group_markdown(groups) + [""] + _legend(groups)
    else:
        lines = _run_table(_labels(run_dirs), [r.row for r in runs])
        lines += ["", f"groups (runs with the same settings but the seed; {len(groups)} of them):"]
        lines += group_table(groups) + _legend(groups)
    return "\n".join(lines + [f"note: {printable(n)}" for n in notes]), []


# --- the figure ------------------------------------------------------------------------------------

def group_labels(groups: list[Group]) -> list[str]:
    """``[k] method settings (n=N)``, with dataset / arch / width where they vary between the groups."""
    vary = [len({getattr(g, a) for g in groups}) > 1 for a in ("dataset", "arch", "width_mult")]
    labels = []
    for k, g in enumerate(groups, 1):
        parts = [v for v, on in zip((g.dataset, g.arch, f"w{g.width_mult}"), vary) if on]
        parts += [g.method] + ([g.settings] if g.settings else [])
        labels.append(f"[{k}] " + " ".join(parts) + f" (n={len(g.counted)})")
    return labels


def mean_records(g: Group) -> list[dict]:
    """The group's epoch records averaged over its seeds (each value over the seeds that have it)."""
    by_epoch: dict[int, list[dict]] = {}
    for r in g.runs:
        for rec in r.records:
            by_epoch.setdefault(rec["epoch"], []).append(rec)
    out = []
    for epoch in sorted(by_epoch):
        recs, mean = by_epoch[epoch], {"epoch": epoch}
        for key in ("test_acc", "train_acc", "val_acc"):
            if all(isinstance(rec.get(key), dict) for rec in recs):
                names = dict.fromkeys(b for rec in recs for b in rec[key])
                mean[key] = {b: _mean([rec[key].get(b) for rec in recs]) for b in names}
        out.append(mean)
    return out


@dataclass
class GroupCurve:
    label: str
    epochs: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def group_curves(groups: list[Group]) -> list[GroupCurve]:
    """Each group's deployed test top-1 per epoch: the mean over the seeds that reached it, and min-max."""
    curves = []
    for g, label in zip(groups, group_labels(groups)):
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for rec in evaluated(r.records):
                per_epoch.setdefault(rec["epoch"], []).append(float(rec["test_acc"]["teacher"]))
        epochs = sorted(per_epoch)
        curves.append(GroupCurve(label, epochs, [statistics.fmean(per_epoch[e]) for e in epochs],
                                 [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs]))
    return curves


def draw_report(groups: list[Group]):
    """Top row: (a) each group's deployed test top-1 per epoch (mean over seeds, min-max shaded), (b) each
    group's last-epoch top-1 as bars (mean +- sample std); bottom row, group means too: the teacher's training
    top-1 and, for groups with students, every branch's test top-1 (groups named by their [k])."""
    import textwrap

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = [textwrap.fill(plot_text(label), 44, subsequent_indent="    ") for label in group_labels(groups)]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    top = max(4.4, 0.32 * sum(label.count("\n") + 1 for label in labels) + 1.5)
    fig = Figure(figsize=(16.5, top + 4.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[top, 4.4])
    ax_a, ax_b = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_a.xaxis.set_major_locator(MaxNLocator(integer=True))
    val_shown = False
    for g, curve, label, color in zip(groups, group_curves(groups), labels, colors):
        if curve.epochs:
            ax_a.fill_between(curve.epochs, curve.low, curve.high, color=color, alpha=0.2, lw=0)
            ax_a.plot(curve.epochs, curve.mean, marker="o", ms=3, color=color, label=label)
        val = [(r["epoch"], r["val_acc"]["teacher"]) for r in mean_records(g) if "val_acc" in r]
        if val:  # validation top-1 (mean over seeds), dashed, without a legend entry of its own
            ax_a.plot(*zip(*val), ls="--", lw=1, color=color, alpha=0.8)
            val_shown = True
    ax_a.set_title("(a) deployed network: test top-1 per epoch (mean over seeds, min\u2013max shaded"
                   + ("; validation dashed)" if val_shown else ")"), fontsize=10)
    ax_a.set(xlabel="epoch", ylabel="top-1 (%)")
    ax_a.grid(alpha=0.3)
    _legend_for(ax_a, len(groups) if len(groups) <= 6 else 99)
    d = [g.as_dict() for g in groups]
    means = [x["top1_last_mean"] for x in d]
    stds = [x["top1_last_std"] or 0.0 for x in d]
    ax_b.barh(range(len(groups)), means, xerr=stds, color=colors, capsize=3, alpha=0.85)
    for i, (m, x) in enumerate(zip(means, d)):
        text = f" {m:.2f}" + (f" \u00b1 {x['top1_last_std']:.2f}" if x["top1_last_std"] is not None else "")
        ax_b.text(m + stds[i], i, text, va="center", fontsize=8)
    ax_b.set_yticks(range(len(groups)), labels, fontsize=8)
    ax_b.invert_yaxis()
    ax_b.set_xlim(0, max(means + [1.0]) * 1.25)
    ax_b.set_title("(b) last-epoch test top-1: mean \u00b1 sample std over seeds", fontsize=10)
    ax_b.set_xlabel("top-1 (%)")
    ax_b.grid(alpha=0.3, axis="x")
    shorts = [f"[{k}]" for k in range(1, len(groups) + 1)]
    panels = panels_of([(short, mean_records(g)) for short, g in zip(shorts, groups)])[1:]  # (a) has the test
    for i, panel in enumerate(panels):
        panel.title = f"({'cd'[i]}) " + panel.title.replace("every branch", "every branch (mean over seeds)")
        _draw_panel(fig.add_subplot(grid[1, i]), panel)
    fig.text(0.01, 0.998, LOSS_NOTE, fontsize=7.5, ha="left", va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig
