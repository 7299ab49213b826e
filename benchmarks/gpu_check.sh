#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU, in the order that protects the numbers: build the
# extension (no build isolation, no downloads), import, compile and tune the kernels the benchmarks
# launch (own time box), the model suites (eager, fused, fused + CUDA graph, torch.compile; 96 and
# 512 px), the operator suite, the 3D UNet++ (64^3 batch 2 bf16: per pruning level, a training step,
# the operator's 3D nodes), a short GPU parity run, compute-sanitizer last, then a markdown report;
# a short table is printed LAST.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, about 8 minutes at most
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh      # anywhere: GPU-only steps skipped, tiny shapes
#
# Results go to $OUT when set, else bench-results/: gpu_check.log (every step's output),
# steps.tsv, rows.jsonl (every measurement, written as it is made), model.json and operator.json
# (pytest-benchmark), report.md. Every step is time-boxed from one overall budget
# (GPU_CHECK_BUDGET_S, default 480 s: 8 minutes), so one hang cannot eat the rest; a failing step is
# reported and the script goes on. Exit status: 0 when every step that ran passed.
#
# Knobs: PYTHON (default python3), GPU_CHECK_COMPILE_MODE (torch.compile mode of the 'compile'
# rows; default 'default' here to fit the budget: the full suites use 'max-autotune'),
# GPU_CHECK_SKIP_BUILD=1, TORCH_CUDA_ARCH_LIST (default 9.0 on the check machine), MAX_JOBS.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
REPORT_RESERVE=20
RESULTS=${OUT:-bench-results}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu_check.log
STEPS=$RESULTS/steps.tsv
ROWS=$RESULTS/rows.jsonl
: >"$LOG"
: >"$STEPS"
: >"$ROWS"
START=$(date +%s)
FAILED=0

export PYTHONUNBUFFERED=1
export BENCH_ROWS="$ROWS"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"

elapsed() { echo $(($(date +%s) - START)); }

# step NAME CAP_SECONDS COMMAND... : run COMMAND with a timeout of min(CAP, what the budget has
# left before the report), its output appended to the log; record name, status, seconds.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - REPORT_RESERVE - $(elapsed)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        printf '%s\tskipped (no time left)\t0\n' "$name" >>"$STEPS"
        echo "[gpu_check] $name: skipped, no time left"
        return 0
    fi
    echo "[gpu_check] $name (limit ${limit}s, at $(elapsed)s)"
    {
        echo
        echo "===== $name (limit ${limit}s, at $(elapsed)s) ====="
        echo "+ $*"
    } >>"$LOG"
    local t0 rc status
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local secs=$(($(date +%s) - t0))
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status="timeout after ${limit}s"
    else
        status="failed (exit $rc)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >>"$STEPS"
    echo "[gpu_check] $name: $status in ${secs}s"
    if [[ $status != ok ]]; then
        FAILED=1
        tail -n 15 "$LOG" | sed 's/^/    | /'
    fi
}

skip_step() {
    printf '%s\tskipped (%s)\t0\n' "$1" "$2" >>"$STEPS"
    echo "[gpu_check] $1: skipped ($2)"
}

# ---- environment ---------------------------------------------------------------------------
step environment 30 bash -c "
    date -u; uname -m; nproc
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())'
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || true
    $PY -c 'import pytest_benchmark; print(\"pytest-benchmark\", pytest_benchmark.__version__)'
"

if [[ $DRY != 0 ]]; then
    DEVICE=cpu
else
    DEVICE=cuda
fi

# ---- build ---------------------------------------------------------------------------------
if [[ $DRY != 0 || ${GPU_CHECK_SKIP_BUILD:-0} != 0 ]]; then
    skip_step build "dry run or GPU_CHECK_SKIP_BUILD: the installed build is used"
else
    step build 240 env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
step import 30 "$PY" -c "import json, unetpp_fast, torch
print(json.dumps(unetpp_fast.build_info(), indent=1, default=str))
device = '$DEVICE'
print('backends usable on', device, unetpp_fast.available_backends(device))"

# ---- compile and tune, in their own time box, exactly the kernels the benchmarks launch ---------
if [[ $DRY != 0 ]]; then
    step "warm kernels (dry)" 60 "$PY" benchmarks/warm_kernels.py --device cpu --sizes 32:1 --dtype fp32 \
        --backends cpu --filters 4,8,8,8,8 --models L1,L4,accurate
else
    step "warm kernels" 150 "$PY" benchmarks/warm_kernels.py --device cuda --sizes 96:64,512:8 --dtype bf16 \
        --backends triton,cuda
fi

# ---- benchmark suites (trimmed) ------------------------------------------------------------
BENCH_ARGS=(-q -p no:cacheprovider --benchmark-columns=median,min,rounds --benchmark-sort=name)
COMPILE_MODE=${GPU_CHECK_COMPILE_MODE:-default}
# The 3D cases run in their own step (BENCH_3D_SIZES=none keeps them out of the 2D steps).
export BENCH_3D_SIZES=none
if [[ $DRY != 0 ]]; then
    export BENCH_SMOKE=1 BENCH_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    step "model suite (smoke)" 120 env BENCH_MODEL_BACKENDS=eager,fused BENCH_TRAIN_BACKENDS=eager,fused \
        "$PY" -m pytest "${BENCH_ARGS[@]}" --benchmark-json="$RESULTS/model.json" benchmarks/test_bench_model.py
    step "operator suite (smoke)" 90 env BENCH_OP_BACKENDS=eager,reference,cpu BENCH_LAYOUTS=cl \
        "$PY" -m pytest "${BENCH_ARGS[@]}" --benchmark-json="$RESULTS/operator.json" benchmarks/test_bench_operator.py
    step "3D suite (smoke)" 90 env BENCH_3D_SIZES=16 BENCH_MODEL_BACKENDS=eager,fused BENCH_TRAIN_BACKENDS=eager,fused \
        BENCH_OP_BACKENDS=eager,cpu BENCH_LAYOUTS=cl BENCH_CONVS="X1,0.conv1 (maxpool)|X0,2.conv1 (2+up)" \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_model.py benchmarks/test_bench_operator.py -k 3d
else
    export BENCH_DEVICE=cuda BENCH_COMPILE_MODE=$COMPILE_MODE
    # Fig. 3 first: pruning levels, U-Net, wide U-Net; each fused backend vs eager; training and memory
    step "model suite 96px bf16" 120 env BENCH_MODEL_SIZES=96 BENCH_SIZES=96 BENCH_MODEL_BATCH=96:64 \
        BENCH_DTYPES=bf16 BENCH_LAYOUTS=cl BENCH_MODELS=L1,L2,L3,L4,unet,wide_unet \
        BENCH_MODEL_BACKENDS=eager,cuda,triton,fused_graph BENCH_TRAIN_BACKENDS=eager,fused BENCH_ROUNDS=10 BENCH_WARMUP=2 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" --benchmark-json="$RESULTS/model.json" benchmarks/test_bench_model.py
    # 3D: the paper's lung-nodule network on 64^3 patches, batch 2, bf16 (fused = what auto picks);
    # per pruning level, U-Net, a training step (peak memory), the 3D saved-for-backward figure, and
    # the operator's key 3D nodes
    step "3D suite 64^3 bf16" 60 env BENCH_3D_SIZES=64 BENCH_3D_MODEL_BATCH=64:2 BENCH_3D_BATCH=64:2 \
        BENCH_3D_DTYPES=bf16 BENCH_LAYOUTS=cl BENCH_3D_MODELS=L1,L2,L3,L4,unet BENCH_MODEL_BACKENDS=eager,fused \
        BENCH_TRAIN_BACKENDS=eager,fused BENCH_OP_BACKENDS=eager,cuda,triton BENCH_CONVS=key BENCH_PASSES=fwd \
        BENCH_ROUNDS=5 BENCH_WARMUP=1 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_model.py benchmarks/test_bench_operator.py -k 3d
    # torch.compile rows apart: compilation is the slowest part, and a timeout here loses nothing else
    step "torch.compile 96px bf16" 110 env BENCH_MODEL_SIZES=96 BENCH_SIZES=96 BENCH_MODEL_BATCH=96:64 \
        BENCH_DTYPES=bf16 BENCH_LAYOUTS=cl BENCH_MODELS=L1,L2,L3,L4,unet,wide_unet BENCH_MODEL_BACKENDS=compile \
        BENCH_ROUNDS=10 BENCH_WARMUP=2 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_model.py -k inference
    step "operator suite" 90 env BENCH_SIZES=96,512 BENCH_BATCH=96:128,512:16 BENCH_CONVS=key BENCH_DTYPES=bf16 \
        BENCH_LAYOUTS=cl BENCH_PASSES=fwd,fwdbwd BENCH_OP_BACKENDS=eager,triton,cuda BENCH_ROUNDS=10 BENCH_WARMUP=2 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" --benchmark-json="$RESULTS/operator.json" benchmarks/test_bench_operator.py
    # with what time is left: 512px (the paper's liver) and fp32, fused vs eager only
    step "model suite 512px bf16" 60 env BENCH_MODEL_SIZES=512 BENCH_SIZES=512 BENCH_MODEL_BATCH=512:8 \
        BENCH_DTYPES=bf16 BENCH_LAYOUTS=cl BENCH_MODELS=L1,L2,L3,L4,unet BENCH_MODEL_BACKENDS=eager,fused,fused_graph \
        BENCH_TRAIN_BACKENDS=eager,fused BENCH_ROUNDS=5 BENCH_WARMUP=1 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_model.py -k "not saved_for_backward"
    step "model suite 96px fp32" 50 env BENCH_MODEL_SIZES=96 BENCH_SIZES=96 BENCH_MODEL_BATCH=96:64 \
        BENCH_DTYPES=fp32 BENCH_LAYOUTS=nchw BENCH_MODELS=L1,L4,unet BENCH_MODEL_BACKENDS=eager,fused \
        BENCH_ROUNDS=5 BENCH_WARMUP=1 \
        "$PY" -m pytest "${BENCH_ARGS[@]}" benchmarks/test_bench_model.py -k "inference"
fi

# ---- GPU tests (short) -----------------------------------------------------------------------------
# A short parity run after the numbers: compile-heavy GPU fuzzing is marked slow and left out.
PARITY=$(ls tests/ops/test_*triton*.py tests/ops/test_*cuda*.py tests/*/test_*parity*.py 2>/dev/null | sort -u | tr '\n' ' ')
step "tests -m cuda" 90 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m "cuda and not slow" tests
if [[ -n $PARITY && $DRY == 0 ]]; then
    # shellcheck disable=SC2086
    step "parity tests" 60 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" $PARITY
elif [[ -z $PARITY ]]; then
    skip_step "parity tests" "no tests/ops/test_*triton*.py, *cuda*.py or *parity*.py files"
else
    skip_step "parity tests" "dry run"
fi

# ---- sanitizers last: slow, and nothing after them depends on them ----------------------------
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [[ $DRY != 0 ]]; then
    step "sanitizer cases (dry: cpu, no sanitizer)" 60 "$PY" benchmarks/sanitizer_cases.py --backend cpu --quick
elif [[ -x $SANITIZER ]]; then
    step "memcheck cuda" 75 "$SANITIZER" --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$PY" benchmarks/sanitizer_cases.py --backend cuda
    step "racecheck cuda" 50 "$SANITIZER" --tool racecheck --error-exitcode 9 --print-limit 20 \
        "$PY" benchmarks/sanitizer_cases.py --backend cuda --quick
    # The Triton kernels (main forward, the packed input convolution, backward) read through masks
    # the interpreter cannot check for out-of-bounds addresses: memcheck them too.
    step "memcheck triton" 45 "$SANITIZER" --tool memcheck --error-exitcode 9 --print-limit 20 \
        "$PY" benchmarks/sanitizer_cases.py --backend triton --quick
else
    skip_step "compute-sanitizer" "not found at $SANITIZER"
fi

# ---- report (the short table is the last thing printed) -------------------------------------
echo "[gpu_check] report at $(elapsed)s; full log: $LOG"
timeout 30 "$PY" benchmarks/report.py --rows "$ROWS" --json "$RESULTS/model.json" --json "$RESULTS/operator.json" \
    --steps "$STEPS" --out "$RESULTS/report.md" >"$RESULTS/short_table.txt" 2>>"$LOG" || FAILED=1
echo
echo "==================== unetpp-fast GPU check ($(elapsed)s, results in $RESULTS) ===================="
cat "$RESULTS/short_table.txt"
rm -f "$RESULTS/short_table.txt"
exit $FAILED
