"""Issue 21: what each method of the study costs per training step, against CE, at the study's setting.

The img/s that the study's runs log mix load levels (two runs shared the two cores, sometimes the test suite
too). This measures the cost the way `teskd bench` does: each method's training step alternated with CE's in one
process, on the same synthetic batches, medians; the ratio is what a user pays per step for the method.

    python benchmarks/overfit_cost.py [--steps 20] [--sweep FILE ...]
prints a markdown table, one row per variant of the sweep files (their seed-0 run's config and overrides;
train.threads as the runs had it).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

DEFAULT_SWEEPS = ("benchmarks/sweeps/overfit_methods.yaml", "benchmarks/sweeps/overfit_confirm.yaml")


def variants(path: str) -> list:
    """One planned run per variant of the sweep file (its first seed): the config it trains."""
    from teskd.sweep_plan import load_sweep

    first = {}
    for run in load_sweep(path).runs:
        first.setdefault(run.variant, run)
    return list(first.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps of each network (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--sweep", action="append", help="sweep file(s); default: the study's two")
    args = p.parse_args(argv)
    from teskd.bench import run_bench
    from teskd.config import load_config

    print(f"`python benchmarks/overfit_cost.py --steps {args.steps}`, {platform.node()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    print("| sweep variant | arch | method | ms/step | CE ms/step (same process) | step time / CE | images/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for path in args.sweep or DEFAULT_SWEEPS:
        for run in variants(path):
            cfg = load_config(run.config, list(run.overrides))
            r = run_bench(cfg, steps=args.steps, warmup=args.warmup, memory=False, progress=False)
            ms = r["step_ms"]
            print(f"| {run.variant} | {cfg.model.arch} x{cfg.model.width_mult:g} | {cfg.method.name} | "
                  f"{ms['method']:.0f} | {ms['ce']:.0f} | {r['step_time_ratio']:.2f}x | "
                  f"{r['images_per_sec']['method']:.0f} |", flush=True)
    print()
    print(f"batch {cfg.data.batch_size}, {r['device']}, {r['threads']} thread(s), torch {r['torch']}; medians of "
          f"{args.steps} steps after {args.warmup} warm-up, each method alternated with CE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
