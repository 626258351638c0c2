#!/bin/bash
# The tables and figures of RESULTS.md's issue-21 study (the network fits its training set), from the committed
# run files (benchmarks/results/overfit*/*/{config.yaml,metrics.jsonl,summary.json}, and the held-out evaluations
# in overfit/heldout_val.json and overfit_search/step2_val.json); finished seeds only count.
#   usage: bash benchmarks/overfit_tables.sh
#   (after: teskd sweep benchmarks/sweeps/overfit_methods.yaml --collect benchmarks/results/overfit --no-run,
#    and the same for overfit_confirm.yaml; overfit_search.yaml collects into benchmarks/results/overfit_search)
set -eu
cd "$(dirname "$0")/results/overfit"
teskd=${TESKD:-teskd}
shopt -s nullglob
tag=w0.125-spc20
echo "### The study's main table: test and held-out top-1, paired with CE per seed (both settings)"
echo "(held-out: the 5,000 training images of step 3's validation split, which no run trains on)"
(cd ../../.. && python benchmarks/overfit_heldout.py)
echo
echo "### Step 2: every method, ResNet-18 1/8, 20 images per class, 200 epochs"
"$teskd" report ce-$tag-s* teskd-$tag-s* teskd-tce1-$tag-s* teskd-detach-$tag-s* label_smoothing-$tag-s* \
  pskd-$tag-s* cskd-$tag-s* byot-$tag-s* one-$tag-s* --format markdown --plot ../overfit_methods.png
echo
echo "### CE and TESKD as published: test and training top-1 per epoch"
"$teskd" report ce-$tag-s* teskd-$tag-s* --format markdown --plot ../overfit_ce_teskd.png
second=(se-ce-$tag-s* se-teskd-$tag-s* se-teskd-detach-$tag-s*)  # overfit_confirm.yaml
if [ ${#second[@]} -gt 0 ]; then
    echo
    echo "### The second setting: SE-ResNet-18 1/8, CE, TESKD as published, TESKD with the KL detached"
    "$teskd" report "${second[@]}" --format markdown --plot ../overfit_confirm.png
fi
echo
echo "### Step 3: the validation search (1 seed; read the validation column of overfit_winner.py, not test)"
(cd ../../.. && python benchmarks/overfit_winner.py) || true
