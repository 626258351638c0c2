#!/bin/bash
# Step-time cost of each student configuration of benchmarks/sweeps/reduced_students.yaml against CE:
# `teskd bench` alternates a TESKD step and a CE step of the same backbone in one process (medians of
# 20 steps after 5 warm-up, batch 128, 32 px, 1 thread), so machine load cancels out of the ratio.
#   usage: bash benchmarks/students_bench.sh [OUT_DIR]   (default benchmarks/results/students-bench)
set -eu
cd "$(dirname "$0")/.."
teskd=${TESKD:-teskd}
out=${1:-benchmarks/results/students-bench}
mkdir -p "$out"
base="configs/cifar100/resnet18_teskd.yaml data.subset_per_class=100 train.threads=1"
only=${ONLY:-*}  # e.g. ONLY='*deepest-stage' to measure some configurations only
bench() {  # name, overrides...
  local name=$1; shift
  [[ $name == $only ]] || return 0
  echo "== $name: $*" >&2
  $teskd bench $base "$@" --steps 20 --warmup 5 --no-memory --json > "$out/$name.json.part"
  mv "$out/$name.json.part" "$out/$name.json"  # a stopped bench leaves no half-written result
}
r18="model.width_mult=0.125"
mnv3="model.arch=tv:mobilenet_v3_small"
all3="method.levels=[1,2,3]"  # explicit: a library network defaults to the deepest student alone
bench r18-teskd-faithful $r18 method.student_width=faithful
bench r18-teskd-stage $r18 method.student_width=stage
bench r18-teskd-stage-dw $r18 method.student_width=stage method.student_branch=depthwise
bench r18-teskd-deepest $r18 "method.levels=[3]" method.student_width=faithful
bench r18-teskd-deepest-stage $r18 "method.levels=[3]" method.student_width=stage
bench mnv3s-teskd-faithful $mnv3 $all3 method.student_width=faithful
bench mnv3s-teskd-stage $mnv3 $all3 method.student_width=stage
bench mnv3s-teskd-stage-dw $mnv3 $all3 method.student_width=stage method.student_branch=depthwise
bench mnv3s-teskd-deepest $mnv3 "method.levels=[3]" method.student_width=faithful
bench mnv3s-teskd-deepest-stage $mnv3 "method.levels=[3]" method.student_width=stage
