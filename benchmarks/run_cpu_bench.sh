#!/usr/bin/env bash
# The CPU speed/memory figures of benchmarks/RESULTS.md: TESKD vs CE training steps (fp32, batch 128),
# reference vs fast students, NCHW vs channels_last, at width 1.0 and 0.25. Output: one JSON line each.
# Run it on an otherwise idle machine: the ratios alternate method/CE steps, but absolute times do not.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=configs/cifar100/resnet18_teskd.yaml
steps=${STEPS:-5}
for width in 0.25 1.0; do
  for variant in "method.fast_students=false train.channels_last=false" \
                 "method.fast_students=true train.channels_last=false" \
                 "method.fast_students=true train.channels_last=true"; do
    # shellcheck disable=SC2086
    teskd bench $cfg model.width_mult=$width $variant --steps "$steps" --warmup 2 --inference --json \
      | python -c "import json,sys; r=json.load(sys.stdin); r['variant']='$variant'; print(json.dumps(r))"
  done
done
