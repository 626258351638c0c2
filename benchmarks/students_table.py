"""RESULTS.md's "Student cost vs gain" table, from the committed run files and the bench JSONs.

    python benchmarks/students_table.py [RESULTS_DIR] [BENCH_DIR]
      (defaults benchmarks/results/reduced, benchmarks/results/students-bench)

Per network: CE, then each TESKD student configuration of benchmarks/sweeps/reduced_students.yaml:
the deployed network's test top-1 (last epoch) as mean ± std over seeds, Δ vs CE, Δ vs the
faithful students (with the share of the faithful students' gain kept, when that gain is
positive), the TESKD/CE step-time
ratio of `teskd bench` (benchmarks/students_bench.sh) and the trained parameters and
multiply-adds per image (from the runs' summaries).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from teskd.runfiles import read_summary

NETWORKS = {  # label -> (CE runs, {config: runs}) as glob patterns in RESULTS_DIR
    "ResNet-18 (CIFAR, width 1/8)": ("ce-e15-s*", {
        "faithful": "teskd-e15-s*", "stage": "r18-teskd-stage-e15-s*", "stage-dw": "r18-teskd-stage-dw-e15-s*",
        "deepest": "r18-teskd-deepest-e15-s*", "deepest-stage": "r18-teskd-deepest-stage-e15-s*",
        "deepest-tce1": "r18-teskd-deepest-tce1-e15-s*"}),
    "MobileNetV3-Small (torchvision)": ("mnv3s-ce-e15-s*", {
        "faithful": "mnv3s-teskd-faithful-e15-s*", "stage": "mnv3s-teskd-stage-e15-s*",
        "stage-dw": "mnv3s-teskd-stage-dw-e15-s*", "deepest": "mnv3s-teskd-deepest-e15-s*",
        "deepest-stage": "mnv3s-teskd-deepest-stage-e15-s*"}),
}
BENCH = {"ResNet-18 (CIFAR, width 1/8)": "r18-teskd-{}", "MobileNetV3-Small (torchvision)": "mnv3s-teskd-{}"}
DESCRIBE = {
    "faithful": "levels 1-3, width C = last stage's, conv branches (the paper)",
    "stage": "levels 1-3, width of each level's own stage, conv branches, projection",
    "stage-dw": "as stage, depthwise branches",
    "deepest": "level 3 only, faithful width, conv branch (the library networks' default)",
    "deepest-stage": "level 3 only, width of stage T3, conv branch, projection",
    "deepest-tce1": "as deepest, teacher CE weight 1.0 instead of 0.2 (exploration)",
}
SAME_COST = {"deepest-tce1": "deepest"}  # a loss weight: the step costs what its base configuration's does


def finished(results: Path, pattern: str) -> list[dict]:
    out = []
    for run in sorted(results.glob(pattern)):
        if (run / "summary.json").is_file():
            s = read_summary(run)  # a summary of either generation, under today's names (deployed_*)
            if s.get("epochs") and s.get("deployed_top1_last") is not None:
                out.append(s)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str]) -> None:
    results = Path(argv[0] if argv else "benchmarks/results/reduced")
    bench_dir = Path(argv[1] if len(argv) > 1 else "benchmarks/results/students-bench")
    print("| network | students | seeds | top-1 (%) | Δ vs CE | Δ vs faithful | step time / CE "
          "| params train | MACs train (M) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, (ce_pattern, configs) in NETWORKS.items():
        ce = finished(results, ce_pattern)
        if not ce:
            print(f"| {label} | CE | 0 | not run | | | | | |")
            continue
        ce_mean, ce_std = mean_std([s["deployed_top1_last"] for s in ce])
        print(f"| {label} | none (CE) | {len(ce)} | {ce_mean:.2f} ± {ce_std:.2f} | | | 1.00 "
              f"| {ce[0]['params_train']:,} | {ce[0]['macs_train'] / 1e6:.1f} |")
        faithful_delta = faithful_mean = None
        for name, pattern in configs.items():
            runs = finished(results, pattern)
            bench_file = bench_dir / (BENCH[label].format(SAME_COST.get(name, name)) + ".json")
            ratio = f"{json.loads(bench_file.read_text())['step_time_ratio']:.2f}" if bench_file.is_file() else "–"
            if not runs:
                print(f"| | {name}: {DESCRIBE[name]} | 0 | not run | | | {ratio} | | |")
                continue
            m, sd = mean_std([s["deployed_top1_last"] for s in runs])
            delta = m - ce_mean
            if name == "faithful":
                faithful_delta, faithful_mean = delta, m
            share = "–" if faithful_mean is None or name == "faithful" else f"{m - faithful_mean:+.2f}"
            if faithful_delta and faithful_delta > 0 and name != "faithful":
                share += f" (keeps {100 * delta / faithful_delta:.0f} % of the gain)"
            print(f"| | {name}: {DESCRIBE[name]} | {len(runs)} | {m:.2f} ± {sd:.2f} | {delta:+.2f} | {share} "
                  f"| {ratio} | {runs[0]['params_train']:,} | {runs[0]['macs_train'] / 1e6:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
