#!/bin/bash
# The reduced-scale comparison of benchmarks/RESULTS.md, in the order its pieces were run. Every step is a
# resumable sweep: stop it at any time (Ctrl-C / SIGTERM saves) and run this script again to continue.
#   usage: bash benchmarks/run_reduced.sh [methods|studies|all]   (default all; the two parts may run at once,
#   one per core: methods = every method x 2 seeds; studies = TESKD's ablations and schedule lengths)
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
if [ "$part" = studies ] || [ "$part" = all ]; then  # one seed of every setting first, then the second
  sweep benchmarks/sweeps/reduced_ablations.yaml --only '*-s0'
  sweep benchmarks/sweeps/reduced_schedule.yaml --only '*-s0'
  sweep benchmarks/sweeps/reduced_ablations.yaml
  sweep benchmarks/sweeps/reduced_schedule.yaml
fi
exit $status
