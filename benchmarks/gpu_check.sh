#!/usr/bin/env bash
# GPU acceptance check (issue 23): every CUDA path teskd has, on a tiny budget, then CE/TESKD step throughput.
#   bash benchmarks/gpu_check.sh [OUT_DIR]       (default benchmarks/results/gpu_check-<date>)
# Exercises: AMP bf16 and fp16 (with the scaler), channels_last, train.compile=true, DDP over NCCL (world size
# 1, and 2 where two GPUs exist), train.sync_bn, pinned-memory loaders (image folders), export +
# predict --device cuda, resume of a CUDA run; then `teskd bench` of CE and TESKD (CIFAR ResNet-18 at 32 px,
# ImageNet ResNet-18 at 224 px) with images/second and peak memory. Writes OUT/gpu_check.json and
# OUT/summary.txt. Without a GPU: one line, exit 0. Data: synthetic (no download), in OUT/data.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch; nothing to check (exit 0)"
  exit 0
fi
OUT=${1:-benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
CIFAR=configs/cifar100/resnet18_ce.yaml
CIFAR_T=configs/cifar100/resnet18_teskd.yaml
RESULTS="$OUT/checks.jsonl"; : > "$RESULTS"

"$PY" - "$OUT/data" <<'PYEOF'
import sys, numpy as np
from pathlib import Path
root = Path(sys.argv[1]); g = np.random.default_rng(0)
c = root / "cifar100"; c.mkdir(parents=True, exist_ok=True)
for split, n in (("train", 2000), ("test", 500)):
    np.savez(c / f"{split}.npz", x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 100,
             classes=np.array([f"c{i}" for i in range(100)]))
from PIL import Image
for split, n in (("train", 8), ("val", 4)):
    for k in range(10):
        d = root / "folder" / split / f"class{k}"; d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(d / f"{i}.png")
PYEOF
DATA="data.root=$OUT/data/cifar100 data.subset_per_class=null data.test_subset_per_class=null"
SMALL="$DATA train.epochs=2 train.progress=false data.batch_size=128 train.device=cuda"

check() {  # check NAME COMMAND...: run it, record ok/failed and seconds
  local name=$1; shift
  local t0=$(date +%s.%N)
  if "$@" > "$OUT/$name.log" 2>&1; then st=ok; else st=failed; fi
  local dt=$(echo "$(date +%s.%N) - $t0" | bc)
  echo "{\"check\": \"$name\", \"status\": \"$st\", \"seconds\": $dt, \"log\": \"$OUT/$name.log\"}" >> "$RESULTS"
  printf '%-28s %-7s %6.1fs\n' "$name" "$st" "$dt"
}

check amp_bf16          "$PY" -m teskd train $CIFAR_T $SMALL train.amp=bf16 --out "$OUT/runs/bf16"
check amp_fp16_scaler   "$PY" -m teskd train $CIFAR_T $SMALL train.amp=fp16 --out "$OUT/runs/fp16"
check channels_last_off "$PY" -m teskd train $CIFAR $SMALL train.channels_last=false --out "$OUT/runs/nchw"
check compile           "$PY" -m teskd train $CIFAR $SMALL train.compile=true --out "$OUT/runs/compile"
check ddp_nccl_1        "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m teskd train $CIFAR $SMALL \
                        train.sync_bn=true --out "$OUT/runs/ddp1"
if [ "$NGPU" -ge 2 ]; then
  check ddp_nccl_2_syncbn "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m teskd train $CIFAR \
                          $SMALL train.sync_bn=true --out "$OUT/runs/ddp2"
fi
check pinned_imagefolder "$PY" -m teskd train configs/imagefolder/small_resnet18_teskd.yaml \
                         data.root="$OUT/data/folder" data.batch_size=16 data.workers=2 train.epochs=1 \
                         train.progress=false train.device=cuda --out "$OUT/runs/folder"
# stopped by SIGTERM after 15 s (it saves), then resumed to the end
check resume_cuda       bash -c "timeout -s TERM 15 $PY -m teskd train $CIFAR $DATA train.epochs=30 train.progress=false \
                        data.batch_size=128 train.device=cuda --out $OUT/runs/resume; \
                        $PY -m teskd train --resume $OUT/runs/resume"
check export_safetensors "$PY" -m teskd export "$OUT/runs/bf16" --out "$OUT/bf16.safetensors" --overwrite
check predict_cuda      "$PY" -m teskd predict "$OUT/runs/bf16" "$OUT/data/folder/val/class0" --device cuda

BENCH="$OUT/bench.jsonl"; : > "$BENCH"
for cfg in "$CIFAR_T" configs/imagenet/resnet18_teskd.yaml; do
  "$PY" -m teskd bench "$cfg" train.device=cuda --steps 20 --warmup 5 --inference --json >> "$BENCH" 2>> "$OUT/bench.err" \
    || echo "{\"config\": \"$cfg\", \"error\": \"see $OUT/bench.err\"}" >> "$BENCH"
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out = Path(sys.argv[1])
checks = [json.loads(x) for x in (out / "checks.jsonl").read_text().splitlines()]
text = (out / "bench.jsonl").read_text()
bench, dec, i = [], json.JSONDecoder(), 0
while i < len(text):
    if text[i].isspace():
        i += 1; continue
    obj, i = dec.raw_decode(text, i); bench.append(obj)
doc = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
       "checks": checks, "bench": bench}
(out / "gpu_check.json").write_text(json.dumps(doc, indent=2))
lines = [f"{doc['gpu']} x{doc['gpus']}, torch {doc['torch']}"]
lines += [f"{c['check']:<28} {c['status']:<7} {c['seconds']:6.1f}s" for c in checks]
lines += [json.dumps(b)[:300] for b in bench]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines)); print(f"written: {out}/gpu_check.json, {out}/summary.txt")
PYEOF
