#!/usr/bin/env bash
# The whole GPU check in one command, for a bare GPU machine without a package index (docs/gpu.md):
#
#     bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT/gpu_check.txt
#
# 1. installs the carried wheels (./wheels, made by benchmarks/gpu_wheels.sh) into a private temp folder;
# 2. tests/gpu, part one: the fast layers against the reference, the trainer on CUDA with every
#    ds_config (resume, bf16 vs fp32);
# 3. the benchmarks: benchmarks/moe_layer.py (small, base), benchmarks/train_step.py (small with
#    32 images, base with 16) and benchmarks/trainer_overhead.py (the real trainer against the plain
#    step, on a 224 px mini-Taskonomy made on the spot), each ratio measured side by side in one run;
# 4. tests/gpu, the rest: evaluation, export and the planner on CUDA;
# 5. benchmarks/train_step.py --compile on the small preset, with what is left of the budget
#    (optional: cut short or skipped, it is recorded but fails nothing).
# Each part has its own deadline inside the budget (default 450 s, under the 8 minutes); the
# parts' deadlines add up to more than the budget, so the later ones run with what the earlier left
# (a part with under 20 s left is recorded as SKIPPED). Everything goes into one file,
# $OUT/gpu_check.txt (OUT defaults to runs/gpu_check). Parts that fail or run out of time are
# recorded and the script goes on; what a part started and left running (the trainer tests start
# their runs in sessions of their own, beyond timeout's reach) is killed before the next part is
# timed. The last line counts the parts that failed; the exit status is 1 if any required part did. Without CUDA
# the GPU tests skip and the benchmarks run their CPU shapes (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.txt"
: > "$RESULTS"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # private: two checks on one machine never share files
trap 'rm -rf "$WORK"' EXIT
FAILED=() MISSED=()  # required parts that failed or were skipped; optional ones
log() { echo "$*" | tee -a "$RESULTS"; }
miss() { if (( optional )); then MISSED+=("$1"); else FAILED+=("$1"); fi; }  # sees part's $optional
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
reap() {  # kill every process that carries part marker $1 in its environment
    local pid
    for pid in $(grep -lsz "^GPU_CHECK_PART=$1\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        kill -9 "$pid" 2>/dev/null && echo "== killed leftover process $pid of this part" >> "$RESULTS"
    done
}
part() {  # part [--optional] NAME SECONDS COMMAND...: run with a deadline, output into the results file
    local optional=0
    [[ $1 == --optional ]] && { optional=1; shift; }
    local name=$1 limit=$2; shift 2
    local remaining; remaining=$(left)
    (( limit > remaining )) && limit=$remaining
    if (( limit < 20 )); then log "== $name: SKIPPED (budget spent)"; miss "$name (skipped)"; return; fi
    log "== $name (limit ${limit}s): $*"
    local t0 marker start; t0=$(date +%s); marker="$$-${#FAILED[@]}-$t0"; start=$(wc -c < "$RESULTS")
    # into the file, not through a pipe: a leftover process holding the pipe would keep this part
    # waiting past its deadline
    GPU_CHECK_PART=$marker timeout --kill-after=10 "$limit" "$@" >> "$RESULTS" 2>&1
    local rc=$?
    reap "$marker"
    tail -c +$(( start + 1 )) "$RESULTS" | tail -n 12  # the part's last lines, on the console too
    (( rc != 0 )) && miss "$name (exit $rc)"
    log "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

if compgen -G "wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" wheels/*.whl >> "$RESULTS" 2>&1
    rc=$?
    (( rc != 0 )) && FAILED+=("wheels (pip exit $rc)")
    log "== wheels: pip exit $rc ($(ls wheels/*.whl | wc -l) wheels into $WORK/site)"
    export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
# The image has pytest plugins of its own (xdist, cov, hypothesis, ...) that the carried pytest would
# load untested: load only pytest-timeout (--strict-markers needs its marker).
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PYTEST=("$PY" -m pytest -p pytest_timeout -p no:cacheprovider -v -rfEs)

log "gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') at $(date -u +%FT%TZ), budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$RESULTS" || true
log "C compilers (Triton builds its launchers with one, for the --compile part): $(command -v gcc cc clang | tr '\n' ' ')"
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

DATA=${GPU_CHECK_DATA:-$WORK/data}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    LAYER_ARGS=(--shapes small base) SMALL_ARGS=(--presets small --batch 32) BASE_ARGS=(--presets base --batch 16)
    # 8 training buildings x 80 views = 640 samples at 224 px: 20 batches of 32, the trainer's two
    # windows of 10 steps inside one epoch (no loader restart in the timed window)
    GEN_ARGS=(--buildings 10 --points 10 --views 8 --resolution 224 --workers 16) SHARD_WORKERS=16
    TRAINER_ARGS=(--steps 10 --set preset=small --set data.batch_size=32 --set data.workers=8
                  --set train.ds_config=ds_configs/zero1_bf16.json)
else  # the CPU dry run: small shapes, few repeats
    LAYER_ARGS=(--shapes cpu --reps 3 --threads 1) SMALL_ARGS=(--presets tiny --batch 2 --repeats 2 --threads 1) BASE_ARGS=()
    GEN_ARGS=(--buildings 4 --points 3 --views 4 --resolution 32 --workers 2) SHARD_WORKERS=2
    TRAINER_ARGS=(--steps 3 --set data.batch_size=4 --set data.workers=1)
fi
# -v: a line per test as it ends, so a run cut by its deadline still says what passed (and -s for
# the trainer's launches, each a line as it ends). The kernels and the trainer first (the crash of
# issue 7), the evaluation, export and planner checks last.
FIRST_TESTS=(tests/gpu/test_layers_cuda.py tests/gpu/test_no_sync_cuda.py tests/gpu/test_launches_cuda.py
             tests/gpu/test_trainer_cuda.py)
part "tests/gpu: kernels, trainer" 240 "${PYTEST[@]}" -s "${FIRST_TESTS[@]}"
part "moe_layer" 90 "$PY" benchmarks/moe_layer.py "${LAYER_ARGS[@]}"
part "train_step small" 75 "$PY" benchmarks/train_step.py "${SMALL_ARGS[@]}"
if (( ${#BASE_ARGS[@]} )); then
    part "train_step base" 75 "$PY" benchmarks/train_step.py "${BASE_ARGS[@]}"
fi
rm -rf "$DATA"
part "trainer_overhead data" 90 bash -c "'$PY' -m data_tools.mini_taskonomy --out '$DATA/raw' ${GEN_ARGS[*]} &&
    '$PY' -m data_tools.make_shards --root '$DATA/raw' --out '$DATA/shards' --split train --no-progress \
        --split-csv '$DATA/raw/splits/train_val_test_mini.csv' --workers $SHARD_WORKERS"
part "trainer_overhead" 120 "$PY" benchmarks/trainer_overhead.py --set "data.shards_dir=$DATA/shards" "${TRAINER_ARGS[@]}"
part "tests/gpu: the rest" 240 "${PYTEST[@]}" tests/gpu \
    "${FIRST_TESTS[@]/#/--deselect=}"
# last, whatever time is left: does torch.compile per block (model.compile) pay on this GPU?
if (( ${#BASE_ARGS[@]} )); then
    part --optional "train_step small, compiled" 150 "$PY" benchmarks/train_step.py "${SMALL_ARGS[@]}" --no-loop --compile
fi
log "gpu_check done in $(( $(date +%s) - START ))s; ${#FAILED[@]} parts failed or skipped${FAILED:+: ${FAILED[*]}}${MISSED:+; optional, not finished: ${MISSED[*]}}"
(( ${#FAILED[@]} == 0 ))
