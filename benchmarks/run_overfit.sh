#!/bin/bash
# Issue 21's study (benchmarks/RESULTS.md, "Does TESKD help when the network fits its training set?"): every
# run of benchmarks/sweeps/overfit_methods.yaml (step 2), two at once (one per core): seed 0 of every method,
# then step 3's validation search (overfit_search.yaml), then seeds 1 and 2. Resumable: stop it at any time (Ctrl-C / SIGTERM: the runs save) and run it again to continue;
# `teskd sweep benchmarks/sweeps/overfit_methods.yaml --status` shows where each run is.
#   usage: bash benchmarks/run_overfit.sh [jobs]   (default 2)
set -u
cd "$(dirname "$0")/.."
export TESKD_DATA=${TESKD_DATA:-$(cd .. && pwd)/shared/data}
teskd=${TESKD:-teskd}
jobs=${1:-2}
step2() { "$teskd" sweep benchmarks/sweeps/overfit_methods.yaml --only "*-s$1" --launcher local --jobs "$jobs"; }
step2 0 || exit $?
"$teskd" sweep benchmarks/sweeps/overfit_search.yaml --launcher local --jobs "$jobs" || exit $?
step2 1 || exit $?
step2 2 || exit $?
