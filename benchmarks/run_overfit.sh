#!/bin/bash
# Issue 21's study (benchmarks/RESULTS.md, "Does TESKD help when the network fits its training set?"): every
# run of its sweep files, two at once (one per core), as two lanes of one run each. Both lanes work through
# the same list: step 3's validation search (overfit_search.yaml, first, so that its choice is known early),
# seeds 1 and 2 of step 2 (overfit_methods.yaml), then the confirmation (overfit_confirm.yaml). A lane skips a
# run that is finished or that the other lane is training (each run folder has a writer lock), so no run is
# trained twice. Within step 2 the question the study is about comes first: the TESKD variants of seed 1, CE
# and the TESKD variants of seed 2, then the second setting, then the other baselines' seeds 1 and 2 (cheap,
# and a stopped study then still answers its main question). Resumable: stop it at any time
# (Ctrl-C / SIGTERM: the runs save) and run it again to continue;
# `teskd sweep benchmarks/sweeps/overfit_methods.yaml --status` shows where each run is.
#   usage: bash benchmarks/run_overfit.sh [lanes]   (default 2; 1 = one run at a time)
set -u -f  # -f: a step such as "step2 *-s1" is split into words, never globbed against files here
cd "$(dirname "$0")/.."
export TESKD_DATA=${TESKD_DATA:-$(cd .. && pwd)/shared/data}
teskd=${TESKD:-teskd}
lanes=${1:-2}
sweeps=benchmarks/sweeps
search() { "$teskd" sweep $sweeps/overfit_search.yaml; }
step2() { "$teskd" sweep $sweeps/overfit_methods.yaml --only "$1"; }  # $1: run names (fnmatch)
confirm() { "$teskd" sweep $sweeps/overfit_confirm.yaml; }

# One lane: its steps in order; a step whose runs fail does not stop the lane (the failure is in its log).
# A signal does: the lane's trainer saves, and the lane ends.
lane() {
    trap 'exit 143' TERM INT
    for step in "$@"; do
        $step
        code=$?
        case $code in 0|1|2) ;; *) exit $code ;; esac  # 130 / 143: a signal stopped the sweep
    done
}

# Everything runs from main, which bash has read whole before it starts: editing this file while it runs
# cannot make the running script read a half-old, half-new line.
main() {
    steps=("step2 teskd*-s1" "step2 ce-*-s2" "step2 teskd*-s2" confirm "step2 *-s1" "step2 *-s2")
    lane search "${steps[@]}" &
    one=$!
    if [ "$lanes" -ge 2 ]; then
        sleep 5  # lane 1 has locked its first run
        lane search "${steps[@]}" &
        two=$!
    fi
    trap 'kill -TERM $one ${two:-} 2>/dev/null' TERM INT
    wait
}
main; exit  # one line: read whole before main runs
