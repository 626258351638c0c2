#!/bin/bash
# Issue 21's study (benchmarks/RESULTS.md, "the over-parameterised regime"), in the order its pieces run.
# Every step is a resumable sweep: stop it at any time (Ctrl-C / SIGTERM saves) and run it again to continue.
#   usage: bash benchmarks/run_overfit.sh [teskd|others|all]   (the two parts may run at once, one per core)
set -u
cd "$(dirname "$0")/.."
export TESKD_DATA=${TESKD_DATA:-$(cd .. && pwd)/shared/data}
teskd=${TESKD:-teskd}
part=${1:-all}
status=0
sweep() { "$teskd" sweep "$@" || status=1; }
for seed in 0 1 2; do  # one seed of everything before the next
  if [ "$part" = teskd ] || [ "$part" = all ]; then
    sweep benchmarks/sweeps/overfit_methods.yaml --only "teskd*-s$seed"
  fi
  if [ "$part" = others ] || [ "$part" = all ]; then
    sweep benchmarks/sweeps/overfit_methods.yaml --only "[!t]*-s$seed"
  fi
done
exit $status
