"""``curves.png``: one run's learning curves, drawn from its ``metrics.jsonl``.

The trainer draws it at the end of every run; ``teskd curves RUN`` redraws it (for runs trained
before this existed, or after a resume). Left panel: test top-1 of every branch per epoch, the
deployed branch first, thickest and black (its val top-1 dashed when the run holds out a split).
Right panel: the training loss and each of its named ``loss_*`` parts.
(``teskd report --plot`` compares several runs; this is the one-run view.)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from numbers import Real
from pathlib import Path

from teskd import fileio
from teskd.errors import TeskdError, printable
from teskd.runfiles import LEGACY_BRANCH, with_deployed_branch

FIGSIZE = (12.0, 4.5)  # inches: two panels, each with its legend beside it
DPI = 120
MARKER_MAX_POINTS = 40  # beyond this many epochs, dots would crowd the lines


def plot_text(text) -> str:
    """A name from a run's files as matplotlib text: control characters escaped, and ``$`` literal (an odd
    number of them, or ``$\\frac{$``, would otherwise be parsed as math and fail the whole drawing)."""
    return printable(text).replace("$", r"\$")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: list[dict], key: str, branch: str | None = None) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``record[key]`` (or ``record[key][branch]``) where present and finite."""
    epochs, values = [], []
    for r in records:
        v = r.get(key)
        if branch is not None:
            v = v.get(branch) if isinstance(v, dict) else None
        x = _number(v)
        if x is not None and isinstance(r.get("epoch"), int):
            epochs.append(r["epoch"])
            values.append(x)
    return epochs, values


def _branches(records: list[dict], key: str, first: str) -> list[str]:
    """Branch names in order of appearance, ``first`` (the deployed one) leading when present."""
    names = list(dict.fromkeys(b for r in records if isinstance(r.get(key), dict) for b in r[key]))
    return sorted(names, key=lambda b: b != first)  # stable: the rest keep their order


def palette(n: int) -> list:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, then evenly spaced along turbo."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def line_style(n_points: int, **kw) -> dict:
    """Line style: dots on every epoch while they stay readable (a 1-epoch run is then a visible dot)."""
    if n_points <= MARKER_MAX_POINTS:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 4)
    return kw


def legend_beside(ax) -> None:
    # beside the axes, never over the curves; the constrained layout makes room for it
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9, frameon=False)


def epoch_axis(ax) -> None:
    """Integer epoch ticks (a 1-epoch run: one tick), an ``epoch`` label and a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(True, which="major", alpha=0.35)


def new_figure(figsize: tuple[float, float], dpi: int = DPI):
    """A matplotlib ``Figure`` on its own Agg canvas, laid out by constrained layout (pyplot's global state is
    not touched: nothing to show, nothing to close). Raises a TeskdError naming the extra when matplotlib is
    missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TeskdError("drawing needs matplotlib, which is not installed: pip install 'teskd[plot]'") from exc
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG, in memory: a caller writes the file only once drawing succeeded."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _draw_accuracy(ax, records: list[dict], deploy_branch: str) -> None:
    branches = _branches(records, "test_acc", deploy_branch)
    others = [b for b in branches if b != deploy_branch]
    colors = dict(zip(others, palette(len(others))))
    for name in branches:
        epochs, values = _series(records, "test_acc", name)
        if not epochs:
            continue
        if name == deploy_branch:
            # thick, but under the thin lines (zorder < 2): a branch that equals it stays visible
            ax.plot(epochs, values, **line_style(len(epochs), color="black", lw=2.8, ms=5.5, zorder=1.5,
                                                 label=f"{plot_text(name)} (deployed)"))
        else:
            ax.plot(epochs, values, **line_style(len(epochs), color=colors[name], lw=1.4, label=plot_text(name)))
    epochs, values = _series(records, "val_acc", deploy_branch)
    if epochs:
        ax.plot(epochs, values, **line_style(len(epochs), color="black", lw=1.8, ls="--", mfc="white", zorder=2.5,
                                             label=f"{plot_text(deploy_branch)} (deployed), val"))
    if not ax.lines:
        _empty(ax, "test accuracy")
    ax.set_title("test top-1 per branch", fontsize=11)
    ax.set_ylabel("top-1 accuracy (%)")


def _draw_losses(ax, records: list[dict]) -> None:
    parts = list(dict.fromkeys(k for r in records for k in r if k.startswith("loss_")))
    keys = (["train_loss"] if any("train_loss" in r for r in records) else []) + parts
    colors = dict(zip(parts, palette(len(parts))))
    drawn = []
    for key in keys:
        epochs, values = _series(records, key)
        if not epochs:
            continue
        if key == "train_loss":
            # a wide grey band under the parts: the dominant part often equals the total and must not vanish
            ax.plot(epochs, values, **line_style(len(epochs), color="0.6", lw=5, ms=8, alpha=0.7, zorder=1.5,
                                                 label="train_loss (total)"))
        else:
            ax.plot(epochs, values, **line_style(len(epochs), color=colors[key], lw=1.4, label=plot_text(key)))
        drawn += values
    if not drawn:
        _empty(ax, "training loss")
    # parts often differ by orders of magnitude (TESKD's loss_feat ~1e-3 beside loss_ce ~3): a linear
    # axis would flatten the small ones onto zero; log only where it is defined (all values positive)
    elif min(drawn) > 0 and max(drawn) / min(drawn) > 100:
        ax.set_yscale("log")
    ax.set_title("training loss (mean over the epoch's batches)", fontsize=11)
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))


def draw_curves(records: list[dict], title: str = "", deploy_branch: str | None = None):
    """The curves as a matplotlib ``Figure`` (Agg canvas; pyplot's global state is not touched).
    ``deploy_branch``: the run's deployed branch (None: unknown, e.g. an unloaded plug-in's; records from
    before the teacher -> deployed rename name it ``teacher``, and are drawn under the run's name)."""
    fig = new_figure(FIGSIZE)
    acc, loss = fig.subplots(1, 2)
    records = [with_deployed_branch(r, deploy_branch) for r in records]  # old records call it "teacher"
    _draw_accuracy(acc, records, deploy_branch or LEGACY_BRANCH)
    _draw_losses(loss, records)
    for ax in (acc, loss):
        epoch_axis(ax)
        if ax.get_yscale() == "log":
            ax.grid(True, which="minor", axis="y", alpha=0.1)
        ax.tick_params(labelsize=9)
        legend_beside(ax)
    if title:
        fig.suptitle(plot_text(title), fontsize=12)
    return fig


def plot_curves(records: list[dict], out: Path, title: str = "", deploy_branch: str | None = None) -> Path:
    """Draw ``records`` (metrics.jsonl epoch records) into the PNG ``out``, atomically; returns ``out``."""
    out = Path(out)
    if not records:
        raise TeskdError(f"no finished epoch to draw into {out}")
    png = png_bytes(draw_curves(records, title, deploy_branch))
    # rendered in memory first: the file is written (.curves.png.tmp, then renamed) only once the
    # drawing succeeded, so a failure never leaves a half-written PNG or the old one damaged
    fileio.atomic_write_bytes(out, png)
    return out


def run_title(name: str, config: dict | None) -> str:
    """``name: method, dataset, arch xwidth, seed N`` from a run's resolved config (the parts present)."""
    config = config if isinstance(config, dict) else {}

    def get(section: str, key: str):
        part = config.get(section)
        return part.get(key) if isinstance(part, dict) else None

    method, dataset, arch = get("method", "name"), get("data", "dataset"), get("model", "arch")
    width, seed = get("model", "width_mult"), get("train", "seed")
    bits = [str(method) if method else None, str(dataset) if dataset else None,
            f"{arch}" + (f" x{width:g}" if isinstance(width, (int, float)) and width != 1 else "") if arch else None,
            f"seed {seed}" if seed is not None else None]
    details = ", ".join(b for b in bits if b)
    return f"{name}: {details}" if details else name


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Redraw a run's curves from ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/curves.png``).
    Its files are read through :mod:`teskd.runfiles` (they may come from anyone)."""
    from teskd.engine.rundir import RunDir
    from teskd.log import log
    from teskd.runfiles import read_config_yaml, read_metrics, read_summary, run_deploy_branch

    run = RunDir(run_dir)
    if not os.path.lexists(run.metrics):  # a FIFO or a link to a device is there: read_metrics says what it is
        what = "no such directory" if not run.path.exists() else f"it has no {run.metrics.name}"
        raise TeskdError(f"cannot draw the curves of {run.path}: {what}, so it is not a teskd run directory")
    records = read_metrics(run.metrics)
    if not records:
        raise TeskdError(f"{run.path} has no finished epoch yet ({run.metrics.name} is empty); nothing to draw")
    config = None
    if os.path.lexists(run.config):
        try:
            config = read_config_yaml(run)
        except TeskdError as exc:  # only the title and label need it
            log.warning(f"warning: {printable(exc)}; drawing without it")
    method = config.get("method") if isinstance(config, dict) else None
    summary = None
    if run.summary.is_file():  # its deployed_branch names a plug-in's branch even when the plug-in is not loaded
        with contextlib.suppress(TeskdError):
            summary = read_summary(run)
    branch = run_deploy_branch(summary, method.get("name") if isinstance(method, dict) else None)
    name = run.path.resolve().name  # "." has no name of its own
    return plot_curves(records, run.curves if out is None else Path(out), run_title(name, config), branch)
