#!/usr/bin/env bash
# The accelerator benchmarks of BENCHMARKS.md, in order of importance, each under its own time
# limit so that one slow step cannot cost the others. Run from the repository root with the
# project and its dependencies importable (`pip install -e .[bench]`, or PYTHONPATH):
#
#   bash benchmarks/gpu.sh OUT_DIR [PYTHON]
#
# Writes OUT_DIR/<name>.json for each benchmark that finished and OUT_DIR/gpu.log (every line
# printed, so a step stopped at its limit still leaves the cohorts it timed).
set -u
out=${1:?usage: gpu.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the device.
log="$out/gpu.log"

step() {  # step SECONDS NAME ARGS...: one benchmark under a time limit; its status is logged.
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$py" "$@" 2>&1 | grep -v -e "Unable to initialize backend" -e "^W[0-9]" | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || true
} 2>&1 | tee -a "$log"

# Limits from the 2026-11-26 H100 run (BENCHMARKS.md): PyTorch's per-client loop runs about 100
# client-steps/s there, so its rows are timed on the small cohorts only; a ViT-B/16 step (which
# compiles the single-client update and every candidate chunk) printed nothing within 150 s.
# About 18 minutes in all.
step 160 round_speed_gpu -m experiments.benchmark --clients 16,64 --chunks 0,16,auto --repeats 2 \
  --out "$out/round_speed_gpu.json"
step 180 round_speed_c1024_gpu -m experiments.benchmark --clients 256,1024 --chunks 0,16,auto --repeats 1 \
  --notorch --out "$out/round_speed_c1024_gpu.json"
step 100 round_speed_vit_ti_gpu -m experiments.benchmark --width 192 --depth 6 --image_size 32 --clients 16 \
  --chunks 0,4,auto --repeats 2 --out "$out/round_speed_vit_ti_gpu.json"
step 120 round_speed_vit_ti_c256_gpu -m experiments.benchmark --width 192 --depth 6 --image_size 32 \
  --clients 256 --chunks 0,4,auto --repeats 1 --notorch --out "$out/round_speed_vit_ti_c256_gpu.json"
step 420 round_speed_vit_b16_gpu -m experiments.benchmark --base_model --clients 16 --chunks 16,auto \
  --local_steps 2 --repeats 1 --notorch --out "$out/round_speed_vit_b16_gpu.json"
step 60 profile_round_gpu -m experiments.profile_round --clients 256 --chunks 0,16 \
  --trace_dir /tmp/hyperlora_profile --out "$out/profile_round_gpu.json"
