"""Tables from finished run directories."""

from __future__ import annotations

import json
from pathlib import Path

from teskd.errors import TeskdError


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise TeskdError(f"{run_dir} has no summary.json (unfinished run or not a run directory)")
    return json.loads(path.read_text())


def summary_table(run_dirs: list[Path]) -> str:
    rows = [("run", "method", "epochs", "top-1 last", "top-1 best", "selected on", "params train",
             "params deploy", "img/s")]
    for run in run_dirs:
        s = read_summary(run)
        rows.append((Path(run).name, s["method"], str(s["epochs"]), f"{s['teacher_top1_last']:.2f}",
                     f"{s['teacher_top1_best']:.2f}", s["selected_on"], f"{s['params_train']:,}",
                     f"{s['params_deploy']:,}", f"{s['train_images_per_sec']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict]:
    from teskd.engine.metrics import MetricsLog

    records = MetricsLog(Path(run_dir) / "metrics.jsonl").read()
    if not records:
        raise TeskdError(f"{run_dir} has no metrics.jsonl records (not a run directory, or no finished epoch)")
    return records


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Training curves of several runs side by side: teacher test top-1, and training loss, per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        records = read_metrics(run)
        epochs = [r["epoch"] for r in records]
        label = Path(run).name
        line, = acc_ax.plot(epochs, [r["test_acc"]["teacher"] for r in records], marker="o", ms=3, label=label)
        if "val_acc" in records[0]:
            acc_ax.plot(epochs, [r["val_acc"]["teacher"] for r in records], ls="--", color=line.get_color(),
                        label=f"{label} (val)")
        loss_ax.plot(epochs, [r["train_loss"] for r in records], marker="o", ms=3, label=label)
    acc_ax.set(title="deployed network (teacher): test top-1", xlabel="epoch", ylabel="top-1 (%)")
    loss_ax.set(title="training loss (all terms)", xlabel="epoch", ylabel="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
