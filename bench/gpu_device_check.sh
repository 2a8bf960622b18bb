#!/usr/bin/env bash
# The one device check of the GPU fast path (issue #7), for a machine with python3 + torch +
# CUDA + triton (this project's package need not be installed: PYTHONPATH points at the tree).
#   bash bench/gpu_device_check.sh          # results under $OUT (default runs/device-check)
# Budget: < 8 minutes on one H100. Each step has its own timeout, and one failing step does
# not stop the next: the kernel tests, the reference/bf16/fused modes for T and S, then
# torch.compile modes for T (the step most likely to break or run long, so last).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run with a timeout, keep its log, record its status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local begin=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "== $name: rc=$rc in $((SECONDS - begin))s" | tee -a "$OUT/status.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step tests 120 $PY -m pytest tests/segnext/test_fast.py -q -p no:cacheprovider
step train_t_s 240 $PY bench/gpu_train.py --variants t s \
    --modes reference bf16 bf16-fused bf16-fused-nmflast --json "$OUT/gpu_train.json"
step compile_t 150 $PY bench/gpu_train.py --variants t --no-infer \
    --modes bf16-compile bf16-fused-compile --json "$OUT/gpu_train_compile.json"
cat "$OUT/status.txt"
