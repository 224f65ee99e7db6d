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

# About 10 minutes of device time in all (the device budget of a lent machine), most important
# first. Issue 25's decoders against transformers + peft (targets: >= 10x the PEFT per-client
# loop at 16 clients per round on the ~1B config, >= 40% MFU against the bf16 peak; memory
# growing with the clients per chunk, not the backbone per client): SmolLM-135M's and
# TinyLlama-1.1B's architectures on random weights, 512-token sequences, 4 a step, 2 steps.
# Then issue 24's real-size vision models (ViT-B/16 at 224 px, CLIP B/32) and the default model.
# A step stopped at its limit still leaves the cohorts it printed in gpu.log. The 2026-11-26 H100
# run's steps (C = 1,024, ViT-Ti, the profile) took 18 minutes and are in that log and BENCHMARKS.md.
text="--seq_len 512 --batch_size 4 --local_steps 2 --repeats 1"
step 130 text_round_speed_smollm_135m_gpu -m benchmarks.text_round_speed --model smollm_135m --clients 8,16,64 \
  --chunks 8,16 $text --out "$out/text_round_speed_smollm_135m_gpu.json"
step 170 text_round_speed_tinyllama_1b_gpu -m benchmarks.text_round_speed --model tinyllama_1b --remat \
  --clients 8,16,64 --chunks 8,16 $text --out "$out/text_round_speed_tinyllama_1b_gpu.json"
step 120 round_speed_vit_b16_gpu -m benchmarks.round_speed --base_model --clients 16,64 --chunks 16 \
  --local_steps 2 --repeats 1 --out "$out/round_speed_vit_b16_gpu.json"
step 80 round_speed_clip_b32_gpu -m benchmarks.round_speed --base_clip --clients 16,64 --chunks 16 \
  --local_steps 2 --repeats 1 --out "$out/round_speed_clip_b32_gpu.json"
step 40 round_speed_gpu -m benchmarks.round_speed --clients 16,64 --chunks 0,auto --repeats 1 --nopeft \
  --out "$out/round_speed_gpu.json"
# Last (issue 37): TinyLlama's round with the attention weights recomputed instead of its blocks,
# beside the --remat step above (compiler estimates: 30% less memory and 1-13% less time on
# TPUs; all 16 clients at once on one H100, where 8 at once were the most before: BENCHMARKS.md).
step 55 text_round_speed_tinyllama_1b_recompute_attention_gpu -m benchmarks.text_round_speed \
  --model tinyllama_1b --recompute_attention --clients 16 --chunks 16 $text \
  --out "$out/text_round_speed_tinyllama_1b_recompute_attention_gpu.json"
