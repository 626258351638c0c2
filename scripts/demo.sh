#!/usr/bin/env bash
# Reduced-scale CE vs TESKD on real CIFAR-100, sized for a 2-core CPU (minutes idle, longer on a loaded machine).
# The same recipe as the paper configs, shrunk: 1/8-width ResNet-18, 100 training images per class,
# 15 epochs with a cosine schedule, accuracy on the first 50 test images of each class. Then the
# exported TESKD teacher (the network you would deploy) is evaluated on the whole test split.
#
# Knobs (environment):
#   TESKD_DATA           folder holding cifar100/ (`make demo` sets ../shared/data). When it does not hold
#                        CIFAR-100, the demo uses ./data/cifar100 instead and downloads CIFAR-100 there
#                        (about 170 MB, MD5-checked) unless it is already there.
#   DEMO_DATA_FALLBACK   that fallback folder instead of ./data (cifar100/ goes below it)
#   TESKD_CIFAR100_URL   a mirror to download from (read by teskd; passed through)
#   DEMO_OUT             where the two runs go (default runs/demo). They are trained in DEMO_OUT.partial and
#                        moved to DEMO_OUT when both have finished; a previous demo is kept as DEMO_OUT.<time>.
#   DEMO_EPOCHS, DEMO_PER_CLASS, DEMO_TEST_PER_CLASS, DEMO_WIDTH   the scale (15, 100, 50, 0.125)
#   DEMO_THREADS         torch CPU threads (train.threads; default 1, 0 = torch's default: all cores). One
#                        thread is fast on a shared machine (a thread competing for a busy core stalls every
#                        step) and gives the numbers the README states: the thread count changes the order of
#                        the floating-point sums, and so the last digits of the results.
#   DEMO_EXTRA           more key=value overrides for both runs and the evaluation, e.g. "train.progress=false"
#   DEMO_DRY_RUN=1       print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

# teskd from the project's virtual environment first, as `make demo` does
if [ -x .venv/bin/teskd ]; then
  PATH="$(pwd)/.venv/bin:$PATH"
fi
if ! command -v teskd >/dev/null 2>&1; then
  echo "error: the teskd command is not installed; run make demo (it creates .venv), or pip install -e ." >&2
  exit 2
fi

dry_run=${DEMO_DRY_RUN:-0}
run() {  # run a command, or with DEMO_DRY_RUN=1 only print it
  if [ "$dry_run" = 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

has_cifar100() {  # the layouts teskd reads: train.npz + test.npz, or the official python pickles
  local d=$1 p
  if [ -f "$d/train.npz" ] && [ -f "$d/test.npz" ]; then return 0; fi
  for p in "$d/cifar-100-python" "$d"; do
    if [ -f "$p/train" ] && [ -f "$p/test" ] && [ -f "$p/meta" ]; then return 0; fi
  done
  return 1
}

# --- data: the offline copy when there is one, else ./data (downloaded once) -----------------------
if [ -n "${TESKD_DATA:-}" ] && has_cifar100 "$TESKD_DATA/cifar100"; then
  data_root=$TESKD_DATA/cifar100
  download=false
  echo "data: CIFAR-100 from $data_root"
else
  if [ -z "${TESKD_DATA:-}" ]; then
    why="TESKD_DATA is not set"
  else
    why="$TESKD_DATA/cifar100 does not hold CIFAR-100"
  fi
  data_root=${DEMO_DATA_FALLBACK:-./data}/cifar100
  download=true
  if has_cifar100 "$data_root"; then
    echo "data: $why; using the copy downloaded earlier in $data_root"
  else
    echo "data: $why; downloading CIFAR-100 (about 170 MB, MD5-checked) into $data_root" \
         "from ${TESKD_CIFAR100_URL:-the official site}"
  fi
fi

epochs=${DEMO_EPOCHS:-15}
per_class=${DEMO_PER_CLASS:-100}
test_per_class=${DEMO_TEST_PER_CLASS:-50}
width=${DEMO_WIDTH:-0.125}
extra=()
read -r -a extra <<< "${DEMO_EXTRA:-}"
extra+=("train.threads=${DEMO_THREADS:-1}")
common=(
  "data.root=$data_root" "data.download=$download"
  "data.subset_per_class=$per_class" "data.test_subset_per_class=$test_per_class"
  "model.width_mult=$width" "train.epochs=$epochs" "schedule.name=cosine" "train.seed=0"
  "${extra[@]}"
)

# --- train: into DEMO_OUT.partial, so a previous demo in DEMO_OUT survives until both runs finish ------
out=${DEMO_OUT:-runs/demo}
work=$out.partial
start=$(date +%s)
# --overwrite replaces only this demo's own unfinished runs (in DEMO_OUT.partial), never DEMO_OUT
run teskd train configs/cifar100/resnet18_ce.yaml "${common[@]}" --out "$work/ce" --overwrite
run teskd train configs/cifar100/resnet18_teskd.yaml "${common[@]}" --out "$work/teskd" --overwrite
seconds=$(( $(date +%s) - start ))
if [ -e "$out" ]; then
  kept=$out.$(date +%Y%m%d-%H%M%S)
  n=1
  while [ -e "$kept" ]; do kept=$out.$(date +%Y%m%d-%H%M%S)-$n; n=$((n + 1)); done
  run mv "$out" "$kept"
  echo "the previous demo is kept in $kept"
fi
run mv "$work" "$out"

# --- results -----------------------------------------------------------------------------------------
echo
echo "CE vs TESKD, CIFAR-100, reduced scale (${common[*]}); $seconds s of training:"
run teskd report "$out/ce" "$out/teskd" --plot "$out/curves.png"
echo
echo "The network you would deploy: the TESKD run's exported teacher (students dropped), on the whole test split:"
run teskd eval "$out/teskd/deployed.safetensors" "data.root=$data_root" "${extra[@]}"
echo
echo "What these numbers mean: a ${width}-width ResNet-18 trained for $epochs epochs on $per_class images" \
     "per class is far from the paper's protocol (full width, all 500 images per class, 200 epochs), so they" \
     "show the pipeline working end to end, not whether TESKD beats CE; the README's Measured section has" \
     "the reduced-scale comparison."
echo
echo "To run teskd yourself: source .venv/bin/activate in your shell (or call .venv/bin/teskd); the README's" \
     "first section walks from training to a prediction from your own export."
