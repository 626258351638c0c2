#!/bin/bash
# The tables and figures of RESULTS.md's reduced-scale comparison, from the committed run files
# (benchmarks/results/reduced/*/{config.yaml,metrics.jsonl,summary.json}).
#   usage: bash benchmarks/reduced_tables.sh   (after: teskd sweep <file> --collect benchmarks/results/reduced --no-run)
set -eu
cd "$(dirname "$0")/results/reduced"
teskd=${TESKD:-teskd}
shopt -s nullglob
methods=(ce-e15-s* teskd-e15-s* label_smoothing-e15-s* kd-e15-s* byot-e15-s* cskd-e15-s* frskd-e15-s* dml-e15-s*
         one-e15-s* okddip-e15-s* dks-e15-s* pskd-e15-s*)
echo "### Every method, 15 epochs"
"$teskd" report "${methods[@]}" --format markdown --plot ../reduced_methods.png
echo
echo "### TESKD's switches, 15 epochs"
"$teskd" report ce-e15-s* teskd-e15-s* teskd-detach-e15-s* teskd-ramp-e15-s* teskd-tce1-e15-s* --format markdown \
  --plot ../reduced_ablations.png
echo
echo "### Schedule length"
"$teskd" report ce-e*-s* teskd-e*-s* --format markdown --plot ../reduced_schedule.png
