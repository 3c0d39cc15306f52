#!/usr/bin/env bash
# The whole GPU check in one command, for a bare GPU machine without a package index (docs/gpu.md):
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT/gpu_check.txt
#
# 1. installs the carried wheels (./wheels, made by benchmarks/gpu_wheels.sh) into /tmp/site;
# 2. the benchmarks: benchmarks/moe_layer.py (small, base) and benchmarks/train_step.py (small with
#    32 images, base with 16), each ratio measured side by side in one run;
# 3. tests/gpu (trainer on CUDA with every ds_config, resume, bf16 vs fp32; the fast layers vs the
#    reference), with whatever time is left of the budget (default 450 s, under the 8 minutes).
# Everything goes into one file, $OUT/gpu_check.txt (OUT defaults to runs/gpu_check). Parts that
# fail or run out of time are recorded and the script goes on. Without CUDA the GPU tests skip and
# the benchmarks run their CPU shapes (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.txt"
: > "$RESULTS"
PY=${PYTHON:-python3}
log() { echo "$*" | tee -a "$RESULTS"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
part() {  # part NAME SECONDS COMMAND...: run with a deadline, output into the results file
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    (( limit > remaining )) && limit=$remaining
    if (( limit < 20 )); then log "== $name: SKIPPED (budget spent)"; return; fi
    log "== $name (limit ${limit}s): $*"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    log "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

if compgen -G "wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

log "gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') at $(date -u +%FT%TZ), budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$RESULTS" || true
"$PY" - <<'PY' 2>&1 | tee -a "$RESULTS"
import sys, torch
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {cuda}",
      torch.cuda.get_device_name() if cuda else "")
for name in ("deepspeed", "timm", "webdataset"):
    try:
        mod = __import__(name); print(f"{name} {mod.__version__}")
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"{name}: {err!r}")
print("grouped_mm:", hasattr(torch.nn.functional, "grouped_mm"))
PY

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    LAYER_ARGS=(--shapes small base) SMALL_ARGS=(--presets small --batch 32) BASE_ARGS=(--presets base --batch 16)
else  # the CPU dry run: small shapes, few repeats
    LAYER_ARGS=(--shapes cpu --reps 3 --threads 1) SMALL_ARGS=(--presets tiny --batch 2 --repeats 2 --threads 1) BASE_ARGS=()
fi
part "moe_layer" 90 "$PY" benchmarks/moe_layer.py "${LAYER_ARGS[@]}"
part "train_step small" 75 "$PY" benchmarks/train_step.py "${SMALL_ARGS[@]}"
if (( ${#BASE_ARGS[@]} )); then
    part "train_step base" 75 "$PY" benchmarks/train_step.py "${BASE_ARGS[@]}"
fi
part "tests/gpu" 400 "$PY" -m pytest -q -rA -p no:cacheprovider tests/gpu
log "gpu_check done in $(( $(date +%s) - START ))s"
