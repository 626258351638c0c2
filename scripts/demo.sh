#!/usr/bin/env bash
# Reduced-scale CE vs TESKD on real CIFAR-100, sized for ~10 minutes of training on a 2-core CPU.
# The same recipe as the paper configs, shrunk: 1/8-width ResNet-18, 100 training images per class,
# 15 epochs with a cosine schedule, accuracy on the first 50 test images of each class.
# Knobs (environment): TESKD_DATA (holds cifar100/), DEMO_OUT, DEMO_EPOCHS, DEMO_PER_CLASS, DEMO_WIDTH.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TESKD_DATA:?set TESKD_DATA to the folder holding cifar100/ (e.g. ../shared/data)}"
out=${DEMO_OUT:-runs/demo}
common=(
  "data.subset_per_class=${DEMO_PER_CLASS:-100}" "data.test_subset_per_class=50"
  "model.width_mult=${DEMO_WIDTH:-0.125}" "train.epochs=${DEMO_EPOCHS:-15}"
  "schedule.name=cosine" "train.seed=0"
)
start=$(date +%s)
teskd train configs/cifar100/resnet18_ce.yaml "${common[@]}" --out "$out/ce" --overwrite
teskd train configs/cifar100/resnet18_teskd.yaml "${common[@]}" --out "$out/teskd" --overwrite
echo
echo "CE vs TESKD, CIFAR-100, reduced scale (${common[*]}); $(( $(date +%s) - start )) s of training:"
teskd report "$out/ce" "$out/teskd" --plot "$out/curves.png"
