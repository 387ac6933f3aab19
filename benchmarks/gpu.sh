#!/usr/bin/env bash
# The speed benchmarks on a GPU, in one go, in under 10 minutes (issue 14, part 5):
#   decode   (bench_decode.py:   steered vs unsteered generation, 3 catalog models, batch 1 and 8)
#   train    (bench_train.py:    steerport's training vs the anchor-style loop)
#   transfer (bench_transfer.py: closed-form map fits vs the anchor's Adam fit, transfer end to end)
# each with --device cuda and a GPU dtype (bf16 where the GPU has it, else fp16), each under its
# own time limit so the whole run stays inside BUDGET seconds; every benchmark writes its results
# as it goes, so a step cut short still leaves what it measured.
#
# Usage (repository root, a CUDA build of torch, the catalog models already in $STEERPORT_HOME —
# a GPU machine without internet cannot pull them; copy ~/.cache/steerport over first):
#   benchmarks/gpu.sh                      # everything, results in benchmarks/results/gpu/
#   BUDGET=300 benchmarks/gpu.sh decode    # some steps only: decode, train, transfer
# Environment: OUT (results folder), DEVICE (cuda), DTYPE (auto: bfloat16 or float16),
#   BUDGET (seconds for all steps, default 540), PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(decode train transfer)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

# one line and exit 1 when there is no GPU or a model is missing (nothing would be measured)
AUTO_DTYPE=$("$PY" - "$DEVICE" <<'EOF'
import sys
import torch
from steerport import catalog
from steerport.models import check_device
from steerport.errors import SteerportError
try:
    dev = check_device(sys.argv[1])
except SteerportError as e:
    sys.exit(f"gpu.sh: {e}")
missing = [m for m in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b") if not catalog.is_cached(m)]
if missing:
    sys.exit(f"gpu.sh: catalog models not in {catalog.steerport_home()}: {', '.join(missing)} (copy them over first)")
print("bfloat16" if dev.type != "cuda" or torch.cuda.is_bf16_supported() else "float16")
EOF
)
DTYPE=${DTYPE:-$AUTO_DTYPE}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "device: $DEVICE, dtype: $DTYPE, budget: ${BUDGET} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p')"
} | tee "$OUT/machine.txt"

START=$SECONDS
# run STEP with at most SHARE seconds (fewer if the budget is running out); a step that runs
# past its limit is stopped and noted, and the next one starts
run_step() {
  local name=$1 share=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$(( share < left ? share : left ))
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (budget spent)" | tee -a "$OUT/machine.txt"
    return 0
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS rc=0
  timeout --signal=INT --kill-after=15 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/machine.txt"
}

for step in "${STEPS[@]}"; do
  case $step in
    decode)
      run_step decode 180 "$PY" benchmarks/bench_decode.py --device "$DEVICE" --dtype "$DTYPE" \
        --new-tokens 24 --reps 8 --hook-reps 3 --out "$OUT/bench_decode" ;;
    train)
      args=(--device "$DEVICE" --dtype "$DTYPE" --out "$OUT/bench_train" --models smollm2-135m,gemma3-270m
            --memory-per-class "")
      run_step train 200 "$PY" benchmarks/bench_train.py "${args[@]}" ;;
    transfer)
      run_step transfer 150 "$PY" benchmarks/bench_transfer.py --device "$DEVICE" --dtype "$DTYPE" \
        --out-dir "$OUT" ;;
    *) echo "gpu.sh: unknown step $step (decode, train, transfer)" >&2; exit 1 ;;
  esac
done
echo "total $((SECONDS - START)) s; results in $OUT/" | tee -a "$OUT/machine.txt"
