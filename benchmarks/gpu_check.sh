#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, one profiled training iteration per case,
# then the end-to-end cost, the kernel microbenchmarks and the VGG-7 point on CUDA,
# each stage with its own timeout. Made
# for a bare machine: a `python3` that already has torch and triton (numpy, pytest),
# no package registry. Nothing is installed: the package is imported from this
# checkout (PYTHONPATH=<root>; asynctrain/_layout.py maps asynctrain.kernels and
# asynctrain.models to kernels/ and models/). Stage limits, kill grace included, add
# up to 475 s (< 8 min); a failing or timed-out stage is recorded and the next one
# still runs; summary.json is rewritten after every stage, so a run cut short still
# brings back what finished. Results go to $OUT when set (the device runner collects
# it), else ./gpu-results/, eight files:
#   summary.json          per stage: exit (124 = timed out), seconds, limit, last log lines
#   stages.log            every stage's output (env first: GPU, driver, versions, paths)
#   pytest-fused.xml      JUnit of the fused-steps CUDA tests (tests/test_steps_triton.py,
#                         tests/test_gpu_runs.py: races, tests/test_compile_once.py,
#                         tests/test_no_sync.py, tests/test_listed_steps.py: no host
#                         sync in the step loops)
#   pytest-kernels.xml    JUnit of the per-op kernel CUDA tests (tests/test_kernels_triton*.py,
#                         tests/test_select_keyed.py)
#   profile.jsonl         benchmarks/profile_iteration.py: one training iteration per case (shd-like
#                         MLP, wide MLP, VGG-7 batch 64 at K=512, 64, 8, passes capped): wall
#                         time, ms per forward step, GPU busy fraction, launches per step,
#                         top kernels
#   cost.jsonl            benchmarks/cost.py: shd-like layered vs engine MS K=8 / K=64
#   kernels.jsonl         benchmarks/kernels.py: select, deliver, conv/rows, LIF, fused steps
#   vgg7.jsonl            benchmarks/cost_vgg7.py: VGG-7 batch 64 at K=64 (peak memory, epoch)
# Exit status: 0 when every stage passed, 1 otherwise.
#
#   make gpu-check                        # or: bash benchmarks/gpu_check.sh
#   PYTHON=/path/to/python STAGE_TIMEOUT_SCALE=2 bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run   # every stage on the CPU, TRITON_INTERPRET=1,
#                                            # tiny sizes (tests/test_gpu_check.py runs it)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT_DIR="${OUT:-./gpu-results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
SCALE="${STAGE_TIMEOUT_SCALE:-1}"
GRACE=5  # seconds between TERM and KILL of a stage past its limit
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [[ $DRY -eq 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # interpreted kernels, CPU tensors
    DEV=cpu
else
    unset TRITON_INTERPRET  # the CUDA tests need compiled kernels
    DEV=cuda
fi
LOG="$OUT_DIR/stages.log"
SUMMARY="$OUT_DIR/summary.json"
: >"$LOG"
rm -f "$OUT_DIR"/{pytest-fused.xml,pytest-kernels.xml,profile.jsonl,cost.jsonl,kernels.jsonl,vgg7.jsonl}

STAGES_JSON=()
FAILED=()
T_START=$(date +%s)

json_str() {  # stdin -> one JSON string (quotes, backslashes, tabs, newlines escaped)
    sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' -e 's/[[:cntrl:]]//g' \
        | awk 'BEGIN { printf "\"" } NR > 1 { printf "\\n" } { printf "%s", $0 } END { printf "\"" }'
}

write_summary() {  # $1: the stage now running (or "" when all are done)
    local tmp="$SUMMARY.tmp" i n=${#STAGES_JSON[@]}
    {
        echo "{\"date\": \"$(date -u +%FT%TZ)\", \"dry_run\": $([[ $DRY -eq 1 ]] && echo true || echo false),"
        echo " \"python\": $(printf '%s' "$PY" | json_str), \"elapsed_s\": $(( $(date +%s) - T_START )),"
        echo " \"running\": $(printf '%s' "$1" | json_str), \"failed\": ["
        for i in "${!FAILED[@]}"; do
            echo -n "  \"${FAILED[$i]}\""; [[ $i -lt $(( ${#FAILED[@]} - 1 )) ]] && echo "," || echo
        done
        echo " ], \"stages\": ["
        for i in "${!STAGES_JSON[@]}"; do
            echo -n "  ${STAGES_JSON[$i]}"; [[ $i -lt $((n - 1)) ]] && echo "," || echo
        done
        echo "]}"
    } >"$tmp"
    mv "$tmp" "$SUMMARY"
}

# run_stage NAME TIMEOUT_S CMD...: output appended to stages.log
run_stage() {
    local name="$1" limit=$(( $2 * SCALE ))
    shift 2
    local cmd="$*" t0 rc=0 part
    write_summary "$name"
    echo "== $name (timeout ${limit}s): ${cmd:0:200}"
    part="$(mktemp)"
    t0=$(date +%s)
    timeout --kill-after="$GRACE" "$limit" "$@" >"$part" 2>&1 </dev/null || rc=$?
    local dt=$(( $(date +%s) - t0 ))
    { echo "===== $name: exit $rc after ${dt}s (limit ${limit}s): $cmd"; cat "$part"; echo; } >>"$LOG"
    tail -n 4 "$part" | sed 's/^/   /'
    echo "   -> exit $rc after ${dt}s"
    [[ $rc -ne 0 ]] && FAILED+=("$name")
    STAGES_JSON+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $dt, \"limit_s\": $limit, \"tail\": $(tail -n 25 "$part" | json_str)}")
    rm -f "$part"
    write_summary ""
    return 0
}

# Stage limits in seconds; with GRACE each, they must stay below 480 s (checked here):
# 15 + 135 + 90 + 55 + 55 + 40 + 50 + 7 x 5 = 475 s. The fused stage compiles the most
# (three kernels per policy, K and flag set, 2-4 s each on sm_90); the profile stage
# compiles the conv kernels once, then runs five iterations of a few seconds each.
LIMITS=(env:15 pytest-fused:135 pytest-kernels:90 profile:55 cost:55 kernels:40 vgg7:50)
total=0
for s in "${LIMITS[@]}"; do total=$(( total + ${s#*:} * SCALE + GRACE )); done
[[ $SCALE -ne 1 || $total -lt 480 ]] || { echo "stage limits add up to ${total}s >= 480s" >&2; exit 2; }
limit() { local s; for s in "${LIMITS[@]}"; do [[ ${s%%:*} == "$1" ]] && echo "${s#*:}"; done; }

PYTEST=("$PY" -m pytest -v --tb=short -p no:cacheprovider -rs -k cuda)  # -v: a killed stage still shows which tests passed
if [[ $DRY -eq 1 ]]; then
    COST_ARGS=(--points tiny:engine:MS:8 --repeat 1 --width-pairs 0)
    KERNEL_ARGS=(--batch 2 --width 129 --ks 1,8 --fanouts 64 --repeat 1 --keyed-batch 2 --keyed-width 4500
                 --keyed-ks 8)
    VGG_ARGS=(--points engine:8 --batch 2 --width 0.0625 --image-size 8 --single)
    PROFILE_ARGS=(--tiny)
else
    # the targets: K=8 vs layered (time, memory), K=64 -> K=8 memory; bandwidth
    # at large K x fan-out; launches per forward step (kernels.py's fused_steps, K 8 and 64)
    COST_ARGS=(--points shd:layered:-:1,shd:engine:MS:8,shd:engine:MS:64 --repeat 3 --width-pairs 0)
    KERNEL_ARGS=(--ks 512 --fanouts 4096)
    VGG_ARGS=(--points engine:64 --batch 64 --single)
    PROFILE_ARGS=()
fi

run_stage env "$(limit env)" bash -c '
    date -u; git rev-parse HEAD 2>/dev/null || echo "(no git)"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"; nvcc --version 2>&1 | tail -n 2 || true
    cc --version 2>&1 | head -n 1 || echo "(no cc: backend=cpu cannot build)"
    "$0" -c "import sys, torch, triton, numpy, pytest
print(sys.executable, sys.version.split()[0])
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"numpy\", numpy.__version__,
      \"pytest\", pytest.__version__)
print(\"cuda available\", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"(no CUDA device)\")
import asynctrain, asynctrain.kernels.steps_triton as s, asynctrain.models as m
print(\"asynctrain from\", asynctrain.__file__, \"kernels from\", s.__file__, \"models from\", m.__file__)
if sys.argv[1] == \"0\" and not torch.cuda.is_available():
    sys.exit(\"no CUDA device: the CUDA tests would all skip (use --dry-run on a CPU)\")" "$1"
' "$PY" "$DRY"
run_stage pytest-fused "$(limit pytest-fused)" "${PYTEST[@]}" --junitxml="$OUT_DIR/pytest-fused.xml" \
    tests/test_steps_triton.py tests/test_gpu_runs.py tests/test_compile_once.py tests/test_no_sync.py \
    tests/test_listed_steps.py
run_stage pytest-kernels "$(limit pytest-kernels)" "${PYTEST[@]}" --junitxml="$OUT_DIR/pytest-kernels.xml" \
    tests/test_kernels_triton.py tests/test_kernels_triton_conv.py tests/test_select_keyed.py
run_stage profile "$(limit profile)" "$PY" benchmarks/profile_iteration.py --device "$DEV" \
    ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"} --out "$OUT_DIR/profile.jsonl"
run_stage cost "$(limit cost)" "$PY" benchmarks/cost.py --device "$DEV" "${COST_ARGS[@]}" \
    --out "$OUT_DIR/cost.jsonl"
run_stage kernels "$(limit kernels)" "$PY" benchmarks/kernels.py --device "$DEV" "${KERNEL_ARGS[@]}" \
    --out "$OUT_DIR/kernels.jsonl"
run_stage vgg7 "$(limit vgg7)" "$PY" benchmarks/cost_vgg7.py --device "$DEV" "${VGG_ARGS[@]}" \
    --out "$OUT_DIR/vgg7.jsonl"

echo "results in $OUT_DIR; failed stages: ${FAILED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]
