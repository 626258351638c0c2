"""``teskd report --plot``: one figure of the groups, drawn with the plotting helpers of
:mod:`teskd.curves` (the one-run view). Top row: (a) each group's deployed test top-1 per epoch (mean over
seeds, min-max shaded, validation dashed), (b) each group's last-epoch top-1 as bars (mean +- sample std);
bottom row, group means too: (c) the deployed network's training top-1 and, for groups with several
branches, (d) every branch's test top-1; last row, where a group has a matching CE group, (e) its paired
difference from CE seed by seed (each seed a dot, mean +- sample std). Groups are named by their ``[k]``, as in
the text table."""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from teskd import fileio
from teskd.curves import epoch_axis, line_style, new_figure, plot_text, png_bytes
from teskd.errors import TeskdError, one_line
from teskd.report.groups import Group, group_runs, mean, std
from teskd.report.runs import evaluated, read_run

DPI = 110
LOSS_NOTE = ("No loss is plotted: a TESKD run logs 0.2 x the cross-entropy summed over all 4 branches plus the "
             "KD and feature terms, not the deployed network's own cross-entropy, so its loss is not comparable "
             "with a CE run's.")


def group_labels(groups: list[Group]) -> list[str]:
    """``[k] method settings (n=N)``, with dataset / arch / width where they vary between the groups."""
    vary = [len({getattr(g, a) for g in groups}) > 1 for a in ("dataset", "arch", "width_mult")]
    labels = []
    for k, g in enumerate(groups, 1):
        parts = [v for v, on in zip((g.dataset, g.arch, f"w{g.width_mult}"), vary) if on]
        parts += [g.method] + ([g.settings] if g.settings else [])
        labels.append(f"[{k}] " + " ".join(parts) + f" (n={len(g.counted)})")
    return labels


def branch_of(g: Group) -> str:
    """The deployed network's name in the group's records (its runs share the method)."""
    return g.runs[0].branch


def mean_records(g: Group) -> list[dict]:
    """The group's epoch records averaged over its seeds (each value over the seeds that have it)."""
    by_epoch: dict[int, list[dict]] = {}
    for r in g.runs:
        for rec in r.records:
            by_epoch.setdefault(rec["epoch"], []).append(rec)
    out = []
    for epoch in sorted(by_epoch):
        recs, averaged = by_epoch[epoch], {"epoch": epoch}
        for key in ("test_acc", "train_acc", "val_acc"):
            if all(isinstance(rec.get(key), dict) for rec in recs):
                names = dict.fromkeys(b for rec in recs for b in rec[key])
                averaged[key] = {b: mean([rec[key].get(b) for rec in recs]) for b in names}
        out.append(averaged)
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
                per_epoch.setdefault(rec["epoch"], []).append(float(rec["test_acc"][r.branch]))
        epochs = sorted(per_epoch)
        curves.append(GroupCurve(label, epochs, [statistics.fmean(per_epoch[e]) for e in epochs],
                                 [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs]))
    return curves


def _legend(ax, entries: int) -> None:
    """Inside the axes for a few entries; below them, in two columns, for many (the layout makes room)."""
    if entries <= 8:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def _series(records: list[dict], key: str, branch: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], (r.get(key) or {}).get(branch)) for r in records]
    points = [(e, float(v)) for e, v in points if isinstance(v, (int, float))]
    return [e for e, _ in points], [v for _, v in points]


def _draw_test(ax, groups: list[Group], labels: list[str], colors: list[str]) -> None:
    """(a): mean test top-1 per epoch, min-max band, validation mean dashed (no legend entry of its own)."""
    val_shown = False
    for g, curve, label, color in zip(groups, group_curves(groups), labels, colors):
        if curve.epochs:
            ax.fill_between(curve.epochs, curve.low, curve.high, color=color, alpha=0.2, lw=0)
            ax.plot(curve.epochs, curve.mean, **line_style(len(curve.epochs), ms=3, color=color, label=label))
        epochs, values = _series(mean_records(g), "val_acc", branch_of(g))
        if epochs:
            ax.plot(epochs, values, ls="--", lw=1, color=color, alpha=0.8)
            val_shown = True
    ax.set_title("(a) deployed network: test top-1 per epoch (mean over seeds, min\u2013max shaded"
                 + ("; validation dashed)" if val_shown else ")"), fontsize=10)
    ax.set_ylabel("top-1 (%)")
    epoch_axis(ax)
    _legend(ax, len(groups) if len(groups) <= 6 else 99)  # wrapped group labels are tall: below from 7 on


def _draw_bars(ax, groups: list[Group], labels: list[str], colors: list[str]) -> None:
    """(b): last-epoch top-1, mean +- sample std over seeds, one bar per group."""
    d = [g.as_dict() for g in groups]
    means = [x["top1_last_mean"] for x in d]
    stds = [x["top1_last_std"] or 0.0 for x in d]
    ax.barh(range(len(groups)), means, xerr=stds, color=colors, capsize=3, alpha=0.85)
    for i, (m, x) in enumerate(zip(means, d)):
        text = f" {m:.2f}" + (f" \u00b1 {x['top1_last_std']:.2f}" if x["top1_last_std"] is not None else "")
        ax.text(m + stds[i], i, text, va="center", fontsize=8)
    ax.set_yticks(range(len(groups)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(means + [1.0]) * 1.25)
    ax.set_title("(b) last-epoch test top-1: mean \u00b1 sample std over seeds", fontsize=10)
    ax.set_xlabel("top-1 (%)")
    ax.grid(alpha=0.3, axis="x")


def _draw_lines(ax, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]]) -> None:
    for label, epochs, values in lines:
        if epochs:
            ax.plot(epochs, values, **line_style(len(epochs), ms=3, label=plot_text(label)))
    ax.set_title(plot_text(title), fontsize=10)
    ax.set_ylabel(ylabel)
    epoch_axis(ax)
    if ax.lines:
        _legend(ax, len(ax.lines))


def _draw_means(fig, grid, groups: list[Group]) -> None:
    """(c) the deployed network's training top-1 and (d), where a group has several branches, every
    branch's test top-1: group means, the groups named by their [k]."""
    means = [(f"[{k}]", mean_records(g), branch_of(g)) for k, g in enumerate(groups, 1)]
    _draw_lines(fig.add_subplot(grid[1, 0]), "(c) deployed network: training top-1 (same quantity for every method)",
                "train top-1 (%), mean over the epoch's augmented batches",
                [(key, *_series(recs, "train_acc", branch)) for key, recs, branch in means])
    multi = [(key, recs) for key, recs, _ in means if len({b for r in evaluated(recs) for b in r["test_acc"]}) > 1]
    if multi:
        lines = [(f"{key}: {name}" if len(multi) > 1 else name, *_series(evaluated(recs), "test_acc", name))
                 for key, recs in multi for name in dict.fromkeys(b for r in evaluated(recs) for b in r["test_acc"])]
        _draw_lines(fig.add_subplot(grid[1, 1]), f"(d) every branch (mean over seeds): test top-1 "
                    f"({', '.join(key for key, _ in multi)})", "top-1 (%)", lines)


def _paired_rows(groups: list[Group], labels: list[str], colors: list[str]) -> list[tuple[str, str, list[float]]]:
    """(label, color, per-seed differences from CE) of the groups with a finished seed that CE also finished."""
    rows = [(label, color, g.paired_deltas()) for g, label, color in zip(groups, labels, colors)]
    return [row for row in rows if row[2]]


def _draw_deltas(ax, rows: list[tuple[str, str, list[float]]]) -> None:
    """(e): last-epoch top-1 minus the matching CE group's, seed by seed (dots), and their mean +- sample std
    (a bar with whiskers), one row per :func:`_paired_rows` entry."""
    ends = [0.0]
    for i, (_, color, deltas) in enumerate(rows):
        m, s = mean(deltas), std(deltas) or 0.0
        ends += [m - s, m + s, *deltas]
        ax.barh(i, m, xerr=s, color=color, alpha=0.35, capsize=3, height=0.6)
        ax.plot(deltas, [i] * len(deltas), "o", color=color, ms=5)
        ax.text(max([m + s, *deltas, 0.0]), i, f"  {m:+.2f}" + (f" \u00b1 {s:.2f}" if len(deltas) > 1 else "")
                + f" (n={len(deltas)})", va="center", fontsize=8)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    span = max(max(ends) - min(ends), 1.0)  # zero always shown, with room for the labels on the right
    ax.set_xlim(min(ends) - 0.1 * span, max(ends) + 0.45 * span)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_title("(e) \u0394 vs CE, paired by seed: last-epoch test top-1 minus CE's with the same seed and "
                 "settings (dots: seeds; bar: mean \u00b1 sample std)", fontsize=10)
    ax.set_xlabel("\u0394 top-1 (points)")
    ax.grid(alpha=0.3, axis="x")


def draw_report(groups: list[Group]):
    """The report figure of ``groups`` (see the module docstring), as a matplotlib Figure."""
    labels = [textwrap.fill(plot_text(label), 44, subsequent_indent="    ") for label in group_labels(groups)]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    top = max(4.4, 0.32 * sum(label.count("\n") + 1 for label in labels) + 1.5)
    paired = _paired_rows(groups, labels, colors)
    bottom = 0.32 * sum(label.count("\n") + 1 for label, _, _ in paired) + 1.5 if paired else 0.0
    fig = new_figure((16.5, top + 4.6 + bottom), dpi=DPI)
    grid = fig.add_gridspec(3 if paired else 2, 2, height_ratios=[top, 4.4] + ([bottom] if paired else []))
    _draw_test(fig.add_subplot(grid[0, 0]), groups, labels, colors)
    _draw_bars(fig.add_subplot(grid[0, 1]), groups, labels, colors)
    _draw_means(fig, grid, groups)
    if paired:
        _draw_deltas(fig.add_subplot(grid[2, :]), paired)
    fig.suptitle(LOSS_NOTE, fontsize=7.5, x=0.01, ha="left")
    return fig


def plot_path(out: Path) -> Path:
    """Where ``--plot OUT`` writes: OUT itself when it ends in .png, else OUT with .png appended."""
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out.with_name(out.name + ".png")


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the report figure of the runs' groups into a PNG (written once drawn); returns the path written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise TeskdError("teskd report --plot needs matplotlib: pip install 'teskd[plot]'") from exc
    out = plot_path(out)
    png = png_bytes(draw_report(group_runs([read_run(r, []) for r in run_dirs])), DPI)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_bytes(out, png)
    except OSError as exc:
        raise TeskdError(f"cannot write the plot {out} ({one_line(exc, 200)})") from exc
    return out
