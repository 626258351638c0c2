#!/bin/bash
# Issue 21's study (benchmarks/RESULTS.md, "Does TESKD help when the network fits its training set?"): every
# run of benchmarks/sweeps/overfit_methods.yaml, two at once (one per core), seed 0 of every method before
# seed 1. Resumable: stop it at any time (Ctrl-C / SIGTERM: the runs save) and run it again to continue;
# `teskd sweep benchmarks/sweeps/overfit_methods.yaml --status` shows where each run is.
#   usage: bash benchmarks/run_overfit.sh [jobs]   (default 2)
set -u
cd "$(dirname "$0")/.."
export TESKD_DATA=${TESKD_DATA:-$(cd .. && pwd)/shared/data}
teskd=${TESKD:-teskd}
jobs=${1:-2}
for seed in 0 1 2; do
  "$teskd" sweep benchmarks/sweeps/overfit_methods.yaml --only "*-s$seed" --launcher local --jobs "$jobs" || exit $?
done
