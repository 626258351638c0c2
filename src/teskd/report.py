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
