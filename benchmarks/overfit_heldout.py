"""Issue 21: every run of the study also measured on a second held-out set, the validation split of step 3.

The study's runs train on the first 20 training images of each CIFAR-100 class; step 3's validation split is
the last 50 of each class (data.val_per_class=50), 5,000 images that no run of the study trains on. Measuring
each finished run's last checkpoint on them gives every method a second, independent test: a difference that
is real shows on both sets, one that is luck of the 10,000 test images need not.

    python benchmarks/overfit_heldout.py [--runs runs/overfit] [--results benchmarks/results/overfit]
evaluates the finished runs not yet measured (`teskd eval RUN --split val data.val_per_class=50`; kept in
RESULTS/heldout_val.json with the command, so the table is re-read from committed files), then prints, per
variant, the test and held-out top-1 (mean ± sample std), each with the per-seed differences from CE's run of
the same seed and architecture, and the training top-1 (last epoch, augmented batches): the study's main table;
then TESKD with the KL detached against TESKD as published, paired by seed in the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

VAL = ["--split", "val", "data.val_per_class=50", "train.threads=1"]
# The study's two comparisons; each file's first variant is its CE, the one its other variants are paired with.
SWEEPS = ("benchmarks/sweeps/overfit_methods.yaml", "benchmarks/sweeps/overfit_confirm.yaml")
# Does detaching the KL help TESKD itself? Each detached variant against TESKD as published on its architecture.
DETACHED = (("teskd-detach", "teskd"), ("se-teskd-detach", "se-teskd"))


def planned() -> list:
    """(run name, variant, seed, CE variant of its sweep file) of every run of the study, in sweep order."""
    from teskd.sweep_plan import load_sweep

    out = []
    for path in SWEEPS:
        runs = load_sweep(path).runs
        out += [(r.name, r.variant, r.seed, runs[0].variant) for r in runs]
    return out


def finished(run: Path):
    """The run as `teskd report` reads it (the deployed branch whatever the run's age) when it has finished,
    else None."""
    from teskd.report import read_run

    if not (run / "summary.json").is_file():
        return None
    info = read_run(run, [])
    return None if info.unfinished else info


def heldout_top1(run: Path, branch: str) -> dict:
    """``branch``'s top-1 on the 5,000 held-out training images, from ``run``'s last checkpoint."""
    command = ["teskd", "eval", str(run), *VAL, "--json"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {"val_top1": result["accuracy"][branch]["top1"],
            "source": f"{shlex.join(command)} (epoch {result['epoch']}, {result['images']} images, "
                      f"{datetime.date.today()})"}


def measure(runs: Path, results: Path) -> dict:
    """name -> {val_top1, test_top1, ...} for every finished run of the study; new ones evaluated and stored."""
    store = results / "heldout_val.json"
    stored = json.loads(store.read_text()) if store.is_file() else {}
    table = {}
    for name, variant, seed, ce in planned():
        info = finished(results / name)
        if info is None:
            continue
        if name not in stored:
            if not (runs / name / "checkpoints" / "last.pt").is_file():
                print(f"{name}: no checkpoint in {runs}, not measured", file=sys.stderr)
                continue
            print(f"{name}: evaluating on the held-out images", file=sys.stderr, flush=True)
            stored[name] = heldout_top1(runs / name, info.branch)
            store.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        table[name] = {**stored[name], "test_top1": info.records[-1]["test_acc"][info.branch],
                       "train_top1": info.train_last, "variant": variant, "seed": seed, "ce": ce}
    return table


def _mean_std(values: list[float], sign: str = "") -> str:
    """``mean ± sample std`` (the mean alone for one value), by the same rule as `teskd report`'s groups."""
    from teskd.report.groups import mean, std

    spread = std(values)
    return f"{mean(values):{sign}.2f}" + ("" if spread is None else f" ± {spread:.2f}")


def _by_variant(table: dict) -> dict[str, dict[int, dict]]:
    """variant -> seed -> row."""
    groups: dict[str, dict[int, dict]] = {}
    for row in table.values():
        groups.setdefault(row["variant"], {})[row["seed"]] = row
    return groups


def _deltas(seeds: dict[int, dict], reference: dict[int, dict], key: str) -> str:
    """``seeds``' differences from ``reference``'s run of the same seed: ``d0 / d1 / ... → mean ± std``
    ("—" when no seed is in both)."""
    pairs = sorted(s for s in seeds if s in reference)
    if not pairs:
        return "—"
    d = [seeds[s][key] - reference[s][key] for s in pairs]
    return " / ".join(f"{x:+.2f}" for x in d) + (f" → {_mean_std(d, '+')}" if len(d) > 1 else "")


def rows(table: dict) -> list[str]:
    """Markdown rows, one per variant: test and held-out top-1, each with the per-seed differences from CE's run
    of the same seed (and their mean ± sample std), and the training top-1."""
    groups = _by_variant(table)
    out = []
    for variant, seeds in groups.items():
        ce_name = next(iter(seeds.values()))["ce"]
        ce = {} if variant == ce_name else groups.get(ce_name, {})

        def top1(key: str) -> str:
            return _mean_std([r[key] for r in seeds.values()])

        out.append(f"| {variant} | {', '.join(map(str, sorted(seeds)))} | {top1('test_top1')} | "
                   f"{_deltas(seeds, ce, 'test_top1')} | {top1('val_top1')} | {_deltas(seeds, ce, 'val_top1')} | "
                   f"{top1('train_top1')} |")
    return out


def pair_rows(table: dict, pairs) -> list[str]:
    """Markdown rows, one per (variant, reference) of ``pairs`` that both have runs: the variant's per-seed
    differences from the reference's run of the same seed, on test and on the held-out images."""
    groups = _by_variant(table)
    return [f"| {variant} − {reference} | {_deltas(groups[variant], groups[reference], 'test_top1')} | "
            f"{_deltas(groups[variant], groups[reference], 'val_top1')} |"
            for variant, reference in pairs if variant in groups and reference in groups]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/overfit"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/overfit"))
    args = p.parse_args()
    table = measure(args.runs, args.results)
    print("| variant | seeds | test top-1 (10,000 images) | Δ vs CE, test: per seed → mean ± std | "
          "held-out top-1 (5,000 images) | Δ vs CE, held-out | training top-1 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows(table)))
    detached = pair_rows(table, DETACHED)
    if detached:
        print("\nThe KL detached against TESKD as published, paired by seed (same architecture):\n")
        print("| variant − reference | Δ test: per seed → mean ± std | Δ held-out |")
        print("| --- | ---: | ---: |")
        print("\n".join(detached))
    return 0


if __name__ == "__main__":
    sys.exit(main())
