#!/usr/bin/env bash
# One command for a CUDA machine (one H100/H200: under 8 minutes): the tuner, the CUDA tests (graph capture,
# sync-debug mode, kernel parity), the layer benchmark against transformers' grouped_mm and HF eager, graphed
# decode, the MoEShard G = 1 overhead, the LoRA mixture kernel timing and a short decode serving run.
# Results go to $OUT when set (the device tool), else to benchmarks/results/, with a summary
# gpu_check_<device>.json (each step's exit status and seconds). Uses the machine's python3 as is: nothing is
# installed (GPU machines here have no package registry).
#   DRY_RUN=1 scripts/gpu_check.sh    # print the steps without running them (works without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TESSERA_CACHE="${TESSERA_CACHE:-$(mktemp -d)}" HF_HOME="${HF_HOME:-$(mktemp -d)}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
STEPS_FILE="$OUT_DIR/gpu_check_steps.tsv"
: > "$STEPS_FILE"
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: run one step, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\t%s\t%s\n' "$name" "dry" 0 >> "$STEPS_FILE"
    return
  fi
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS_FILE"
  [ "$rc" -eq 0 ] || status=1
}

if [ "$DRY_RUN" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: gpu_check.sh needs one')" || exit 2
fi

# Block configurations for the registry families' shapes on this GPU, written under $OUT_DIR/kernel_configs
# (copy them into tessera_kernels/configs/ to use them). Short: bf16, G = 1, four token counts.
TUNE_ARGS=${TUNE_ARGS:---tokens 1 16 256 4096 --out "$OUT_DIR/kernel_configs"}
if [ "$DRY_RUN" = 1 ]; then
  $PY scripts/tune_moe.py --dry-run $TUNE_ARGS | tail -5  # lists the shapes and files; needs no GPU
fi
step tune_moe 50 $PY scripts/tune_moe.py $TUNE_ARGS
# Every CUDA-marked test: kernel parity, captured MoE layers and graphed decode against eager (test_cuda_graphs),
# LoRA kernels; then MoE layers under torch.cuda.set_sync_debug_mode("error") (test_sync) as a step of its own.
step cuda_tests 70 $PY -m pytest -q -m cuda tests -k "not sync_debug_mode" -p no:cacheprovider
step sync_debug 25 $PY -m pytest -q tests/moe/test_sync.py -k sync_debug_mode -p no:cacheprovider
# Layer benchmark: tessera triton/torch against transformers' grouped_mm and HF eager; + graphed decode steps.
step bench_moe_layer 75 $PY scripts/bench_moe_layer.py --device cuda --dtype bfloat16 --repeats 5 \
  --experts 8,128 --tokens 16,256,4096,32768 --decode-graphs --out "$OUT_DIR"
step moeshard_overhead 35 $PY scripts/bench_moeshard.py --single-gpu-overhead --out "$OUT_DIR"
step lora_kernels 20 $PY scripts/bench_routing.py --kernels-only --device cuda --out "$OUT_DIR/routing_kernels_cuda.json"
# Decode serving, short: the continuous scheduler and the static batcher on one GPU rank each, tiny-mixtral-shaped
# weights, 16 arrivals/s for 5 s (needs fastapi, uvicorn, httpx and aiohttp on the machine; the step fails if not).
step serve_decode 150 $PY scripts/bench_serve.py --workload decode --ranks 1 --schedulers continuous,static \
  --rates 16 --seconds 5 --grace 15 --out "$OUT_DIR"

$PY - "$OUT_DIR" "$STEPS_FILE" "$DRY_RUN" <<'EOF'
import json, os, sys
out, steps_file, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
device = "dry_run"
if not dry:
    import torch
    device = torch.cuda.get_device_name(0)
steps = []
for line in open(steps_file):
    step, code, seconds = line.rstrip("\n").split("\t")
    steps.append({"step": step, "exit": int(code) if code.isdigit() else code, "seconds": int(seconds)})
name = "gpu_check_" + "".join(c if c.isalnum() else "_" for c in device).strip("_").lower() + ".json"
path = os.path.join(out, name)
with open(path + ".tmp", "w") as f:
    json.dump({"device": device, "steps": steps}, f, indent=2)
os.replace(path + ".tmp", path)
print("wrote", path)
EOF
rm -f "$STEPS_FILE"
exit $status
