"""``teskd report``: a table of runs (finished or not) and their training curves.

A run without a (valid) summary.json, e.g. still running or killed, is reported from metrics.jsonl
and marked unfinished; a damaged metrics.jsonl is a one-line error, except for a torn last line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from teskd.engine.metrics import MetricsLog
from teskd.engine.rundir import METRICS, SUMMARY, RunDir
from teskd.errors import TeskdError, one_line


def _run_dir(path: Path) -> RunDir:
    run = RunDir(path)
    if not run.path.exists():
        raise TeskdError(f"no such run directory: {run.path}")
    if not run.path.is_dir():
        raise TeskdError(f"{run.path} is a file, not a run directory")
    if not run.summary.exists() and not run.metrics.exists():
        raise TeskdError(f"{run.path} is not a teskd run directory (it has no {SUMMARY} and no {METRICS})")
    return run


def read_summary(run: RunDir) -> dict:
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TeskdError(f"{run.summary} is empty or not valid JSON ({one_line(exc, 200)})") from exc
    keys = ("method", "epochs", "teacher_top1_last", "teacher_top1_best", "selected_on")  # what the table needs
    if not isinstance(summary, dict) or not all(k in summary for k in keys):
        raise TeskdError(f"{run.summary} is not a JSON object with {', '.join(keys)}")
    return summary


def _is_record(r) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("epoch"), int) and isinstance(r.get("test_acc"), dict)
            and isinstance(r["test_acc"].get("teacher"), (int, float)))


def read_metrics(run: RunDir, notes: list[str]) -> list[dict]:
    """The epoch records; a torn last line is dropped with a note, any other bad line is a TeskdError."""
    path = run.metrics
    records = MetricsLog(path).read(
        check=_is_record, on_torn=lambda n: notes.append(f"ignored the incomplete last line ({n}) of {path}"))
    if not records:
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
    try:  # the table shows "?" where the config is missing or unreadable
        cfg = yaml.safe_load(run.config.read_text())
        method, planned = str(cfg["method"]["name"]), int(cfg["train"]["epochs"])
    except Exception:
        method, planned = "?", "?"
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
            if not run.metrics.is_file():
                raise TeskdError(f"{exc}, and {run.path} has no {METRICS} to report it from instead") from exc
            notes.append(f"{exc}; {run.path.name} is reported from {METRICS}")
    if summary is None:
        return _row_from_metrics(run, read_metrics(run, notes), notes)
    if run.metrics.is_file():  # a finished run resumed for more epochs has an older summary.json
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

    def num(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"

    rows = [("run", "method", "epochs", "top-1 last", "top-1 best", "selected on", "params train",
             "params deploy", "img/s")]
    for label, r in zip(_labels(run_dirs), rows_):
        rows.append((label, r.method, r.epochs, f"{r.top1_last:.2f}", f"{r.top1_best:.2f}", r.selected_on,
                     num(r.params_train, ","), num(r.params_deploy, ","), num(r.images_per_sec, ".0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(not r.finished for r in rows_):
        lines.append(f"unfinished: no {SUMMARY} yet (still running, stopped or killed); numbers are from "
                     f"{METRICS} up to the last finished epoch")
    lines += [f"note: {n}" for r in rows_ for n in r.notes]
    return "\n".join(lines)


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
    runs = [(label, read_metrics(RunDir(r), [])) for label, r in zip(_labels(run_dirs), run_dirs)]
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


def draw_panels(panels: list[Panel]):
    """A matplotlib figure with one axis per panel (not pyplot's: nothing is shown, nothing to close)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.5 * len(panels), 4.4))
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        for s in panel.series:
            ax.plot(s.epochs, s.values, marker="o", ms=3, ls="--" if s.dashed else "-", label=s.label)
        ax.set_title(panel.title, fontsize=10)
        ax.set(xlabel="epoch", ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=8)
    fig.text(0.01, 0.01, LOSS_NOTE, fontsize=7.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_path(out: Path) -> Path:
    """Where ``--plot OUT`` writes: OUT itself when it ends in .png, else OUT with .png appended."""
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out.with_name(out.name + ".png")


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the runs' curves (see ``curve_panels``) into a PNG; returns the path actually written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TeskdError("teskd report --plot needs matplotlib: pip install 'teskd[plot]'") from exc
    out = plot_path(out)
    fig = draw_panels(curve_panels(run_dirs))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, format="png")
    except OSError as exc:
        raise TeskdError(f"cannot write the plot {out} ({one_line(exc, 200)})") from exc
    return out
