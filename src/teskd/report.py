"""``teskd report``: a table of runs (finished or not) and their training curves.

A finished run is reported from its ``summary.json``. A run without one (still running,
stopped, killed, imported and fine-tuned) is reported from ``metrics.jsonl`` and marked
unfinished, e.g. ``3/200 unfinished``. A damaged ``summary.json`` falls back to the metrics
with a note; a damaged ``metrics.jsonl`` is a one-line error naming the file and line, except
for a torn last line (a kill while it was written), which is ignored with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from teskd.errors import TeskdError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"

# What the table needs from summary.json.
_SUMMARY_KEYS = ("method", "epochs", "teacher_top1_last", "teacher_top1_best", "selected_on")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise TeskdError(f"no such run directory: {run_dir}")
    if not run_dir.is_dir():
        raise TeskdError(f"{run_dir} is a file, not a run directory")
    if not (run_dir / SUMMARY).exists() and not (run_dir / METRICS).exists():
        raise TeskdError(f"{run_dir} is not a teskd run directory (it has no {SUMMARY} and no {METRICS})")


# --- reading ----------------------------------------------------------------------------------


def read_summary(run_dir: Path) -> dict:
    """``RUN/summary.json`` as a dict with the keys the table needs; TeskdError naming the file otherwise."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise TeskdError(f"{run_dir} has no {SUMMARY} (the run has not finished)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TeskdError(f"{path} is empty or not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(summary, dict):
        raise TeskdError(f"{path} does not hold a JSON object")
    missing = [k for k in _SUMMARY_KEYS if k not in summary]
    if missing:
        raise TeskdError(f"{path} lacks {', '.join(missing)}")
    return summary


def _check_record(record) -> None:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not isinstance(record.get("epoch"), int):
        raise ValueError("no integer 'epoch'")
    acc = record.get("test_acc")
    if not isinstance(acc, dict) or not isinstance(acc.get("teacher"), (int, float)):
        raise ValueError("no test_acc.teacher")


def read_metrics(run_dir: Path, notes: list[str] | None = None) -> list[dict]:
    """The epoch records of ``RUN/metrics.jsonl``.

    A last line that does not parse (torn by a kill mid-write) is dropped, with a note
    appended to ``notes``; any other bad line, or no record at all, is a TeskdError naming
    the file.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise TeskdError(f"{run_dir} has no {METRICS} (not a teskd run directory)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TeskdError(f"cannot read {path} ({_one_line(exc)})") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            _check_record(record)
        except ValueError as exc:
            if position == len(numbered) - 1:  # torn by a kill while it was being written
                if notes is not None:
                    notes.append(f"ignored the incomplete last line ({number}) of {path}")
                break
            raise TeskdError(f"{path} line {number} is not an epoch record ({_one_line(exc)}); "
                             f"the file is damaged or was edited") from exc
        records.append(record)
    if not records:
        raise TeskdError(f"{path} holds no finished epoch (the run has not finished its first epoch, "
                         f"or the file was emptied)")
    return records


def _configured(run_dir: Path) -> tuple[str | None, int | None]:
    """``method.name`` and ``train.epochs`` from ``RUN/config.yaml`` (None where unreadable)."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG).read_text())
        method, epochs = cfg["method"]["name"], cfg["train"]["epochs"]
    except Exception:  # missing, unreadable or not a teskd config: the table shows "?"
        return None, None
    return (method if isinstance(method, str) else None,
            epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None)


# --- the table -------------------------------------------------------------------------------


@dataclass
class RunRow:
    run: Path
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


def _row_from_metrics(run: Path, records: list[dict], notes: list[str]) -> RunRow:
    method, planned = _configured(run)
    selected_on = "val" if all("val_acc" in r for r in records) else "test"
    scores = [r[f"{selected_on}_acc"]["teacher"] for r in records]
    best = records[scores.index(max(scores))]  # the first maximum, as training selects it
    seconds = [r.get("epoch_seconds") for r in records]
    rates = [r.get("train_images_per_sec") for r in records]
    ips = None
    if all(isinstance(v, (int, float)) for v in seconds + rates) and sum(seconds) > 0:
        ips = sum(s * v for s, v in zip(seconds, rates)) / sum(seconds)  # images / seconds over all epochs
    done = records[-1]["epoch"]
    return RunRow(run, method or "?", f"{done}/{planned if planned is not None else '?'} unfinished",
                  records[-1]["test_acc"]["teacher"], best["test_acc"]["teacher"], selected_on,
                  images_per_sec=ips, finished=False, notes=notes)


def run_row(run_dir: Path) -> RunRow:
    """One table row: from summary.json when the run finished, else from metrics.jsonl (unfinished)."""
    run = Path(run_dir)
    _check_run_dir(run)
    notes: list[str] = []
    summary = None
    if (run / SUMMARY).exists():
        try:
            summary = read_summary(run)
        except TeskdError as exc:
            if not (run / METRICS).is_file():
                raise TeskdError(f"{exc}, and {run} has no {METRICS} to report it from instead") from exc
            notes.append(f"{exc}; {run.name} is reported from {METRICS}")
    if summary is None:
        return _row_from_metrics(run, read_metrics(run, notes), notes)
    if (run / METRICS).is_file():  # a finished run resumed for more epochs has an older summary.json
        try:
            records = read_metrics(run, notes)
        except TeskdError as exc:
            notes.append(f"{exc}; the row of {run.name} comes from {SUMMARY} alone")
            records = []
        if records and records[-1]["epoch"] > summary["epochs"]:
            notes.append(f"{run / SUMMARY} is from epoch {summary['epochs']}, but {METRICS} goes on to epoch "
                         f"{records[-1]['epoch']}; {run.name} is reported from {METRICS}")
            return _row_from_metrics(run, records, notes)
    return RunRow(run, str(summary["method"]), str(summary["epochs"]), float(summary["teacher_top1_last"]),
                  float(summary["teacher_top1_best"]), str(summary["selected_on"]), summary.get("params_train"),
                  summary.get("params_deploy"), summary.get("train_images_per_sec"), notes=notes)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short names for runs: the folder name, or parent/name where names repeat."""
    names = [Path(r).name or str(r) for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(*Path(r).resolve().parts[-2:])) for r in run_dirs]


def summary_table(run_dirs: list[Path]) -> str:
    """The comparison table of ``run_dirs``, then a ``note:`` line for anything unusual."""
    run_dirs = [Path(r) for r in run_dirs]
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
        lines.append("unfinished: no summary.json yet (still running, stopped or killed); numbers are from "
                     "metrics.jsonl up to the last finished epoch")
    lines += [f"note: {n}" for r in rows_ for n in r.notes]
    return "\n".join(lines)


# --- curves ----------------------------------------------------------------------------------


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


def _series(label: str, records: list[dict], get, dashed: bool = False) -> Series | None:
    points = [(r["epoch"], get(r)) for r in records]
    points = [(e, float(v)) for e, v in points if isinstance(v, (int, float))]
    if not points:
        return None
    return Series(label, [e for e, _ in points], [v for _, v in points], dashed)


def _branch(key: str, name: str):
    return lambda r: (r.get(key) or {}).get(name)


def curve_panels(run_dirs: list[Path], notes: list[str] | None = None) -> list[Panel]:
    """What ``plot_runs`` draws: quantities comparable across methods, plus every branch of multi-branch runs.

    1. the deployed network's (teacher's) test top-1 per epoch (validation dashed);
    2. the teacher's training top-1 per epoch (averaged over the epoch's augmented batches), the
       same quantity for every method (the teacher's own training loss is not logged by TESKD);
    3. for runs with students (TESKD), each branch's test top-1 per epoch.
    """
    run_dirs = [Path(r) for r in run_dirs]
    runs = [(label, read_metrics(r, notes)) for label, r in zip(_labels(run_dirs), run_dirs)]
    test, train, branches = [], [], []
    multi = [(label, records) for label, records in runs
             if len({b for r in records for b in r["test_acc"]}) > 1]
    for label, records in runs:
        test.append(_series(label, records, _branch("test_acc", "teacher")))
        if all("val_acc" in r for r in records):
            test.append(_series(f"{label} (val)", records, _branch("val_acc", "teacher"), dashed=True))
        train.append(_series(label, records, _branch("train_acc", "teacher")))
    for label, records in multi:
        names = list(dict.fromkeys(b for r in records for b in r["test_acc"]))
        for name in names:
            branches.append(_series(f"{label}: {name}" if len(multi) > 1 else name, records,
                                    _branch("test_acc", name)))
    panels = [Panel("deployed network (teacher): test top-1", "top-1 (%)", [s for s in test if s]),
              Panel("teacher: training top-1 (same quantity for every method)",
                    "train top-1 (%), mean over the epoch's augmented batches",
                    [s for s in train if s])]
    if multi:
        panels.append(Panel(f"every branch: test top-1 ({', '.join(label for label, _ in multi)})", "top-1 (%)",
                            [s for s in branches if s]))
    return panels


def draw_panels(panels: list[Panel]):
    """A matplotlib figure with one axis per panel (Agg backend; nothing is shown)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        for s in panel.series:
            ax.plot(s.epochs, s.values, marker="o", ms=3, ls="--" if s.dashed else "-", label=s.label)
        ax.set(title=panel.title, xlabel="epoch", ylabel=panel.ylabel)
        ax.title.set_fontsize(10)
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


def plot_runs(run_dirs: list[Path], out: Path, notes: list[str] | None = None) -> Path:
    """Draw the runs' curves (see ``curve_panels``) into a PNG; returns the path actually written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TeskdError("teskd report --plot needs matplotlib: pip install 'teskd[plot]' "
                         "(or pip install matplotlib)") from exc
    import matplotlib.pyplot as plt

    out = plot_path(out)
    fig = draw_panels(curve_panels(run_dirs, notes))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110, format="png")
    except OSError as exc:
        raise TeskdError(f"cannot write the plot {out} ({_one_line(exc)})") from exc
    finally:
        plt.close(fig)
    return out
