#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU (H100/H200), in at most 8 minutes,
#   the machine (nvidia-smi, torch/triton versions), the GPU tests (pytest -m gpu), the kernel
#   table at the target shapes, the training step against sparsify at n=131072 and n=2^20, and
#   ESM2 extraction on the GPU.
# Usage: bash bench/gpu_check.sh [--smoke]
#   Results go to $OUT if set, else bench/gpu_check_<UTC time>/: gpu_check.log (everything),
#   one NAME.json (the suite's JSON) and NAME.log (its stderr) per part, and summary.json.
#   Each part has its own timeout, and all of them together stop by the 8-minute deadline, so
#   one hung part costs only its own time. --smoke runs every part on the CPU at tiny sizes
#   (checks the script itself; no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT_DIR=${OUT:-$ROOT/bench/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
STATUS="$OUT_DIR/status.tsv"
: > "$STATUS"

# part NAME SECONDS COMMAND...: run COMMAND with its stdout in NAME.json (suites) or NAME.out,
# its stderr in NAME.log, under min(SECONDS, time left before the deadline).
part() {
    local name=$1 own=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 5))
    local limit=$((own < left ? own : left))
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, no time left"
        printf '%s\tskipped\t0\t%s\n' "$name" "$own" >> "$STATUS"
        return
    fi
    local out="$OUT_DIR/$name.out"
    case " $* " in *" --json "*) out="$OUT_DIR/$name.json" ;; esac
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out" 2> "$OUT_DIR/$name.log"
    local rc=$?
    local took=$((SECONDS - started))
    local state=ok
    [ $rc -ne 0 ] && state="failed (exit $rc)"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && state="timed out"
    echo "== $name: $state after ${took}s; stdout $out, stderr $OUT_DIR/$name.log"
    [ $rc -ne 0 ] && tail -n 15 "$OUT_DIR/$name.log"
    [ "$out" = "$OUT_DIR/$name.out" ] && tail -n 25 "$out"
    printf '%s\t%s\t%s\t%s\n' "$name" "$state" "$took" "$limit" >> "$STATUS"
}

echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $ROOT; results in $OUT_DIR"
if [ $SMOKE -eq 0 ]; then
    nvidia-smi || echo "nvidia-smi: not available"
fi

# What the check needs; installed only when missing. A machine without a package index keeps
# going with what it has: the parts that need a missing package say so in their own logs.
needs="import torch, triton, sae_kernels, sae_engine.benchmarks, pytest, pytest_benchmark, psutil, sparsify, esm"
if ! "$PY" -c "$needs" > /dev/null 2>&1; then
    part install 150 bash .ci/install bench
fi
if ! "$PY" -c "import sae_engine.benchmarks, sae_kernels" > /dev/null 2>&1; then
    # Not installed: import this checkout's packages by their names (kernels/sae_kernels/).
    ALIAS=$(mktemp -d)
    ln -s "$ROOT/sae_engine" "$ALIAS/sae_engine"
    ln -s "$ROOT/kernels/sae_kernels" "$ALIAS/sae_kernels"
    export PYTHONPATH="$ALIAS${PYTHONPATH:+:$PYTHONPATH}"
    echo "== using this checkout's packages through PYTHONPATH=$PYTHONPATH"
fi

part versions 30 "$PY" -c "
import json, torch, triton
from sae_kernels.hardware import cpu_info
cuda = torch.cuda.is_available()
print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'triton': triton.__version__,
                  'gpu': torch.cuda.get_device_name() if cuda else None,
                  'capability': '.'.join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                  'cpu': cpu_info().describe()}, indent=1))
" --json

BENCH=("$PY" -m sae_engine.benchmarks)
if [ $SMOKE -eq 1 ]; then
    DEVICE=cpu
    part gpu_tests 120 "$PY" -m pytest tests kernels/tests -m gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
    part kernels 60 "${BENCH[@]}" kernels --device cpu --shape 64,16,256,4 --repeats 1 --in-process --json
    part train_step_n131072 60 "${BENCH[@]}" train-step --device cpu --d-in 16 --n-latents 128 --k 4 --batch 32 \
        --peers sparsify --steps 1 --warmup 1 --in-process --json
    part train_step_n1048576 60 "${BENCH[@]}" train-step --device cpu --d-in 16 --n-latents 256 --k 4 --batch 32 \
        --peers sparsify --steps 1 --warmup 1 --sequential --in-process --json
    part esm 60 "${BENCH[@]}" esm --device cpu --model random:2,32,4 --random-sequences --proteins 8 --layers 1,2 \
        --contenders fair-esm,fair-esm-bf16,ours-fp32,ours-bf16 --accuracy-proteins 4 --in-process --json
else
    DEVICE=cuda
    # Compiled Triton kernels at scale, the CUDA ring buffer.
    part gpu_tests 120 "$PY" -m pytest tests kernels/tests -m gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml"
    # bf16 and fp32, B=4096, d=1280, n=131072 and 1048576; PASS/FAIL lines for the GPU targets.
    part kernels 110 "${BENCH[@]}" kernels --device cuda --shape target --repeats 5 --json
    part train_step_n131072 60 "${BENCH[@]}" train-step --device cuda --d-in 1280 --n-latents 131072 --k 32 \
        --batch 4096 --peers sparsify --steps 10 --warmup 3 --json
    # One contender in memory at a time: each holds about 40 GiB at n=2^20 (weights, Adam, grads).
    part train_step_n1048576 90 "${BENCH[@]}" train-step --device cuda --d-in 1280 --n-latents 1048576 --k 32 \
        --batch 4096 --peers sparsify --steps 5 --warmup 2 --sequential --json
    # ESM2 at the 650M shape (random weights: speed does not depend on them), fp32 and bf16.
    part esm 60 "${BENCH[@]}" esm --device cuda --model random:33,1280,20 --random-sequences --proteins 256 \
        --layers 16,33 --contenders fair-esm,fair-esm-bf16,ours-fp32,ours-bf16 --accuracy-proteins 8 --json
fi

"$PY" - "$OUT_DIR" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
parts = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, state, seconds, limit = line.split("\t")
    parts[name] = {"state": state, "seconds": int(seconds), "limit_s": int(limit)}
    result = out / f"{name}.json"
    if result.exists():
        try:
            parts[name]["result"] = json.loads(result.read_text())
        except json.JSONDecodeError:
            parts[name]["result"] = None  # a part that died mid-output; see its .log
(out / "summary.json").write_text(json.dumps({"device": device, "parts": parts}, indent=1))
print("== summary: " + ", ".join(f"{name} {p['state']} ({p['seconds']}s)" for name, p in parts.items()))
EOF
echo "== done in ${SECONDS}s; results in $OUT_DIR"
