#!/usr/bin/env bash
# The CPU speed/memory figures of benchmarks/RESULTS.md: TESKD vs CE training steps (fp32, batch 128),
# reference vs fast students, NCHW vs channels_last, at width 1.0 and 0.25. Output: JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=configs/cifar100/resnet18_teskd.yaml
steps=${STEPS:-5}
for width in 1.0 0.25; do
  for variant in "method.fast_students=false train.channels_last=false" \
                 "method.fast_students=true train.channels_last=false" \
                 "method.fast_students=true train.channels_last=true"; do
    # shellcheck disable=SC2086
    teskd bench $cfg model.width_mult=$width $variant --steps "$steps" --warmup 2 --inference --json \
      | python -c "import json,sys; r=json.load(sys.stdin); r['variant']='$variant'; print(json.dumps(r))"
  done
done
