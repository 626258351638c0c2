"""Issue 21, step 3: apply the declared rule of benchmarks/sweeps/overfit_search.yaml. Each candidate's
validation top-1 at its last epoch (the 5,000 held-out training images of data.val_per_class=50); the TESKD
variant with the highest one wins, and is worth confirming on the test set only if it beats CE's.

Two candidates were not trained by the search: they repeat overfit_methods.yaml's seed-0 runs bit for bit (see
the sweep file), so their validation top-1 is measured on those runs' last checkpoints with `teskd eval` (kept
in RESULTS/step2_val.json, so the choice can be re-read from committed files).

    python benchmarks/overfit_winner.py [--runs runs] [--results benchmarks/results]
prints the table, then the winning variant's name as the last line (``none`` when no TESKD variant beats CE
on validation); exits 1 while a candidate is unfinished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from overfit_heldout import finished, heldout_top1  # the same held-out measurement for every run of the study

TAG = "w0.125-spc20-s0"
SEARCHED = ("ce", "tce1-detach", "tce1-deepest", "tce1-ramp")  # trained by overfit_search.yaml
FROM_STEP2 = {"teskd": "teskd", "tce1": "teskd-tce1"}  # candidate -> its identical run of overfit_methods.yaml


def searched(results: Path, name: str) -> dict | None:
    info = finished(results / "overfit_search" / f"{name}-{TAG}")
    if info is None:
        return None
    last = info.records[-1]
    return {"val_top1": last["val_acc"][info.branch], "train_top1": info.train_last,
            "source": f"overfit_search/{name}-{TAG}, epoch {last['epoch']}"}


def from_step2(runs: Path, results: Path, name: str) -> dict | None:
    """The stored evaluation, or a new one of the step-2 run's last checkpoint (when the run has finished)."""
    store = results / "overfit_search" / "step2_val.json"
    stored = json.loads(store.read_text()) if store.is_file() else {}
    if name in stored:
        return stored[name]
    run = runs / "overfit" / f"{FROM_STEP2[name]}-{TAG}"
    info = finished(results / "overfit" / run.name)
    if info is None or not (run / "checkpoints" / "last.pt").is_file():
        return None
    stored[name] = {**heldout_top1(run, info.branch), "train_top1": info.train_last}
    store.write_text(json.dumps(stored, indent=2) + "\n")
    return stored[name]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    table = {name: searched(args.results, name) for name in SEARCHED}
    table.update({name: from_step2(args.runs, args.results, name) for name in FROM_STEP2})
    print(f"{'candidate':<14} {'val top-1':>9} {'train top-1':>11}  source")
    for name, row in table.items():
        if row is None:
            print(f"{name:<14} {'unfinished':>9}")
        else:
            print(f"{name:<14} {row['val_top1']:>9.2f} {row['train_top1']:>11.2f}  {row['source']}")
    if any(row is None for row in table.values()):
        print("not every candidate has finished: no choice yet", file=sys.stderr)
        return 1
    teskd = {k: v for k, v in table.items() if k != "ce"}
    winner = max(teskd, key=lambda k: teskd[k]["val_top1"])
    margin = teskd[winner]["val_top1"] - table["ce"]["val_top1"]
    print(f"best TESKD variant: {winner}, {margin:+.2f} points of validation top-1 over CE"
          + ("" if margin > 0 else ": no TESKD variant beats CE on validation"))
    print(winner if margin > 0 else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
