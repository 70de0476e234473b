#!/usr/bin/env bash
# One prepared GPU session (~9.5 min at most, stage timeouts summed): the CUDA tests, the kernel
# microbenchmarks and the end-to-end cost benchmark on CUDA. Every stage has its own
# timeout; a failing stage is recorded and the next one still runs. Results go to
# $OUT when set (the device runner collects it), else ./gpu-results/:
#   env.txt                 GPU, driver, versions
#   pytest-cuda.xml / .log  `pytest -k cuda` (kernels vs twins on the GPU, compiled)
#   kernels.jsonl / .log    benchmarks/kernels.py --device cuda
#   cost.jsonl / .log       benchmarks/cost.py --device cuda --quick
#   vgg7.jsonl / .log       benchmarks/cost_vgg7.py: VGG-7 batch 64 at K=64 (peak memory,
#                           epoch estimate; the issue's 16 GB target)
#   summary.json            per stage: exit code (124 = timed out), seconds, log
# Exit status: 0 when every stage passed, 1 otherwise.
#   make gpu-check                        # or: bash benchmarks/gpu_check.sh
#   PYTHON=/path/to/python STAGE_TIMEOUT_SCALE=2 bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu-results}"
mkdir -p "$OUT_DIR"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
SCALE="${STAGE_TIMEOUT_SCALE:-1}"
unset TRITON_INTERPRET  # the CUDA tests need compiled kernels

STAGES_JSON=()
FAILED=()

# run_stage NAME TIMEOUT_S LOG CMD...
run_stage() {
    local name="$1" limit=$(( $2 * SCALE )) log="$3"
    shift 3
    local cmd="$*" t0 rc=0
    echo "== $name (timeout ${limit}s): ${cmd:0:160}"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local dt=$(( $(date +%s) - t0 ))
    tail -n 5 "$log" | sed 's/^/   /'
    echo "   -> exit $rc after ${dt}s"
    [[ $rc -ne 0 ]] && FAILED+=("$name")
    STAGES_JSON+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $dt, \"log\": \"$(basename "$log")\"}")
    return 0
}

run_stage env 30 "$OUT_DIR/env.txt" bash -c "
    date -u; git rev-parse HEAD 2>/dev/null || true; nvidia-smi || true
    '$PY' -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__);
print(\"cuda available\", torch.cuda.is_available());
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA device\")'"

run_stage pytest-cuda 120 "$OUT_DIR/pytest-cuda.log" \
    "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda --junitxml="$OUT_DIR/pytest-cuda.xml" tests

run_stage kernels 150 "$OUT_DIR/kernels.log" \
    "$PY" benchmarks/kernels.py --device cuda --out "$OUT_DIR/kernels.jsonl"

run_stage cost 150 "$OUT_DIR/cost.log" \
    "$PY" benchmarks/cost.py --device cuda --quick --out "$OUT_DIR/cost.jsonl"

run_stage vgg7 120 "$OUT_DIR/vgg7.log" \
    "$PY" benchmarks/cost_vgg7.py --device cuda --points engine:64 --batch 64 --single \
    --out "$OUT_DIR/vgg7.jsonl"

{
    echo "{\"date\": \"$(date -u +%FT%TZ)\", \"failed\": ["
    first=1
    for f in "${FAILED[@]+"${FAILED[@]}"}"; do
        [[ $first -eq 1 ]] || echo ","
        echo -n "\"$f\""; first=0
    done
    echo "], \"stages\": ["
    n=${#STAGES_JSON[@]}
    for i in "${!STAGES_JSON[@]}"; do
        echo -n "  ${STAGES_JSON[$i]}"; [[ $i -lt $((n - 1)) ]] && echo "," || echo
    done
    echo "]}"
} >"$OUT_DIR/summary.json"

echo "results in $OUT_DIR; failed stages: ${FAILED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]
