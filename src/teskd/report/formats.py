"""The report as text: ``table`` (the runs, then the groups, in about 120 columns), ``markdown`` (the groups
as one wide GitHub table), ``csv`` (one row per group) and ``json`` (group objects with their runs).

Text, markdown and csv print numbers rounded (2 decimals in tables, :data:`CSV_DECIMALS` in csv), never float
noise such as ``-11.899999999999999``; json keeps full precision for programs that compute with it.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

from teskd.engine.rundir import METRICS, SUMMARY
from teskd.errors import TeskdError, printable
from teskd.report.groups import Group, group_runs
from teskd.report.runs import RunRow, read_run

FORMATS = ("table", "markdown", "csv", "json")
WIDTH = 120  # columns the text table's lines keep to (prose is wrapped; a long run name can still exceed it)
CSV_DECIMALS = 4  # top-1 in %: 0.0001 points is far below any difference a run can show
DASH = "\u2014"  # an em dash: no value


# --- the per-run table -----------------------------------------------------------------------------------

def labels_of(run_dirs: list[Path]) -> list[str]:
    """Short names for runs: the folder name, or parent/name where names repeat."""
    names = [Path(r).name or str(r) for r in run_dirs]
    return names if len(set(names)) == len(names) else [str(Path(*Path(r).resolve().parts[-2:])) for r in run_dirs]


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"


def _aligned(rows: list[tuple | list], left: set[int]) -> list[str]:
    """Columns padded to their widest cell (left-aligned where the index is in ``left``), a rule under the
    header row, trailing spaces dropped."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def run_table(labels: list[str], rows_: list[RunRow]) -> list[str]:
    """One line per run (and the ``unfinished:`` legend when needed); no notes. Names from run folders are
    printed with their control characters escaped."""
    rows = [("run", "method", "epochs", "top-1 last", "top-1 best", "selected on", "params train",
             "params deploy", "img/s")]
    for label, r in zip(labels, rows_):
        rows.append((printable(label), printable(r.method), printable(r.epochs), f"{r.top1_last:.2f}",
                     f"{r.top1_best:.2f}", printable(r.selected_on), _num(r.params_train, ","),
                     _num(r.params_deploy, ","), _num(r.images_per_sec, ".0f")))
    lines = _aligned(rows, {0, 1, 2})
    if any(not r.finished for r in rows_):
        lines += _wrapped(f"unfinished: no {SUMMARY} yet (still running, stopped or killed); numbers are from "
                          f"{METRICS} up to the last finished epoch")
    return lines


def _wrapped(text: str, first: str = "", rest: str = "") -> list[str]:
    """Prose in lines of at most WIDTH columns (a path or name longer than that keeps its own line)."""
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)


# --- the groups' cells (shared by table and markdown) ----------------------------------------------------

def _pm(mean: float | None, std: float | None) -> str:
    return DASH if mean is None else f"{mean:.2f} \u00b1 " + (DASH if std is None else f"{std:.2f}")


def _cells(g: Group) -> dict[str, str]:
    """Every column of a group, as printed (names and settings escaped: they come from run folders)."""
    d = g.as_dict()
    count = lambda v: DASH if v is None else f"{v:,}"  # noqa: E731
    macs = lambda v: "not measured" if v is None else f"{v / 1e6:,.1f}M"  # noqa: E731
    paired = (DASH if d["delta_paired_mean"] is None else f"{d['delta_paired_mean']:+.2f} \u00b1 "
              + (DASH if d["delta_paired_std"] is None else f"{d['delta_paired_std']:.2f}")
              + f" ({d['delta_paired_n']})")
    branches = d["test_acc_last_mean"]
    cells = {"dataset": g.dataset, "arch": g.arch, "width": g.width_mult, "method": g.method,
             "settings": g.settings or DASH, "n": str(d["n"]), "epochs": d["epochs"],
             "top-1 last": _pm(d["top1_last_mean"], d["top1_last_std"]),
             "top-1 best": _pm(d["top1_best_mean"], d["top1_best_std"]),
             "\u0394 vs CE": DASH if d["delta_vs_ce"] is None else f"{d['delta_vs_ce']:+.2f}",
             "\u0394 paired": paired,
             "train top-1": DASH if d["train_top1_last_mean"] is None else f"{d['train_top1_last_mean']:.2f}",
             "img/s": DASH if d["train_images_per_sec"] is None else f"{d['train_images_per_sec']:,.0f}",
             "params train": count(d["params_train"]), "params deploy": count(d["params_deploy"]),
             "MACs train": macs(d["macs_train"]), "MACs deploy": macs(d["macs_deploy"]),
             "branches (last top-1)": " ".join(f"{b}={v:.2f}" for b, v in branches.items())
             if len(branches) > 1 else DASH}
    return {k: printable(v) for k, v in cells.items()}


GROUP_COLUMNS = ("dataset", "arch", "width", "method", "settings", "n", "epochs", "top-1 last", "top-1 best",
                 "\u0394 vs CE", "\u0394 paired", "train top-1", "img/s", "params train", "params deploy",
                 "MACs train", "MACs deploy", "branches (last top-1)")  # markdown: all in one table
_LEFT = {"#", "dataset", "arch", "method", "settings", "epochs", "branches (last top-1)"}
# the text table splits them in two narrower blocks; settings and branches are lines of their own
RESULT_COLUMNS = ("#", "dataset", "arch", "width", "method", "n", "epochs", "top-1 last", "top-1 best",
                  "\u0394 vs CE", "\u0394 paired")
COST_COLUMNS = ("#", "train top-1", "img/s", "params train", "params deploy", "MACs train", "MACs deploy")


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


# --- text ------------------------------------------------------------------------------------------------

def _block(columns: tuple[str, ...], cells: list[dict[str, str]]) -> list[str]:
    rows = [list(columns)] + [[c[name] for name in columns] for c in cells]
    return _aligned(rows, {i for i, name in enumerate(columns) if name in _LEFT})


def _keyed_lines(title: str, items: list[tuple[str, str]]) -> list[str]:
    """``title`` then ``[k] text`` per item, wrapped to WIDTH under its key."""
    lines, width = [title], max(len(key) for key, _ in items)
    for key, text in items:
        lines += _wrapped(text, f"{key.ljust(width)} ", " " * (width + 1))
    return lines


def group_table(groups: list[Group]) -> list[str]:
    """The groups in about WIDTH columns: results, each group's settings, cost, and branches, keyed [k]
    (the figure's keys)."""
    cells = [{**_cells(g), "#": f"[{k}]"} for k, g in enumerate(groups, 1)]
    lines = _block(RESULT_COLUMNS, cells)
    if any(g.settings for g in groups):
        lines += _keyed_lines("settings (what differs between the groups):",
                              [(c["#"], c["settings"]) for c in cells])
    lines += [""] + _block(COST_COLUMNS, cells)
    several = [(c["#"], c["branches (last top-1)"]) for c in cells if c["branches (last top-1)"] != DASH]
    if several:
        lines += _keyed_lines("every branch's last test top-1 (mean over seeds):", several)
    return lines + [part for line in _legend(groups) for part in _wrapped(line)]


def group_markdown(groups: list[Group]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(GROUP_COLUMNS) + " |",
             "|" + "|".join(" --- " if name in _LEFT else " ---: " for name in GROUP_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(_cells(g)[name]) for name in GROUP_COLUMNS) + " |" for g in groups]
    return lines + [""] + _legend(groups)


# --- csv and json ----------------------------------------------------------------------------------------

CSV_COLUMNS = ("dataset", "arch", "width_mult", "method", "settings", "n", "seeds", "epochs", "unfinished",
               "top1_last_mean", "top1_last_std", "top1_best_mean", "top1_best_std", "delta_vs_ce",
               "delta_paired_mean", "delta_paired_std", "delta_paired_n", "train_top1_last_mean",
               "train_images_per_sec", "params_train", "params_deploy", "macs_train", "macs_deploy", "run_dirs")


def _csv_value(value):
    """A cell: empty for no value, a float rounded (its shortest repr then has no noise digits)."""
    if value is None:
        return ""
    return round(value, CSV_DECIMALS) if isinstance(value, float) else value


def group_csv(groups: list[Group]) -> str:
    dicts = [g.as_dict() for g in groups]
    branches = list(dict.fromkeys(b for d in dicts for b in d["test_acc_last_mean"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"last_{b}" for b in branches)])
    for d in dicts:
        row = {**d, "seeds": " ".join(map(str, d["seeds"])), "run_dirs": " ".join(d["run_dirs"])}
        writer.writerow([_csv_value(row[c]) for c in CSV_COLUMNS]
                        + [_csv_value(d["test_acc_last_mean"].get(b)) for b in branches])
    return buf.getvalue().rstrip("\n")


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
        lines = group_markdown(groups)
    else:
        lines = run_table(labels_of(run_dirs), [r.row for r in runs])
        lines += ["", f"groups (runs with the same settings but the seed; {len(groups)} of them):"]
        lines += group_table(groups)
    return "\n".join(lines + [f"note: {printable(n)}" for n in notes]), []
