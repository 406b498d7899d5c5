#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA tests, then the GPU benchmarks, in under 5 minutes.
# Results go to $OUT when set (the device tool), else to benchmarks/results/. Uses the machine's python3 as is:
# nothing is installed (GPU machines here have no package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run one step, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step cuda_tests 100 $PY -m pytest -q -m cuda tests -p no:cacheprovider
step bench_moe_layer 100 $PY scripts/bench_moe_layer.py --device cuda --dtype bfloat16 --repeats 5 --out "$OUT_DIR"
step moeshard_overhead 70 $PY scripts/bench_moeshard.py --single-gpu-overhead --out "$OUT_DIR"
step routing_kernels 30 $PY scripts/bench_routing.py --kernels-only --device cuda --out "$OUT_DIR/routing_kernels_cuda.json"
exit $status
