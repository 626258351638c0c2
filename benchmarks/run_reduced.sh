#!/bin/bash
# The reduced-scale comparison of benchmarks/RESULTS.md, in the order its pieces were run. Every step is a
# resumable sweep: stop it at any time (Ctrl-C / SIGTERM saves) and run this script again to continue.
#   usage: bash benchmarks/run_reduced.sh [methods|ablations|schedule|all]   (default all)
set -u
cd "$(dirname "$0")/.."
export TESKD_DATA=${TESKD_DATA:-$(cd .. && pwd)/shared/data}
teskd=${TESKD:-teskd}
part=${1:-all}
status=0
sweep() { "$teskd" sweep "$@" || status=1; }
if [ "$part" = methods ] || [ "$part" = all ]; then
  sweep benchmarks/sweeps/reduced_kd_teacher.yaml
  sweep benchmarks/sweeps/reduced_methods.yaml --only '*-s0'
  sweep benchmarks/sweeps/reduced_methods.yaml
fi
if [ "$part" = ablations ] || [ "$part" = all ]; then
  sweep benchmarks/sweeps/reduced_ablations.yaml
fi
if [ "$part" = schedule ] || [ "$part" = all ]; then
  sweep benchmarks/sweeps/reduced_schedule.yaml
fi
exit $status
