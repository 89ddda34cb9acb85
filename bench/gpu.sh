#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on one H100 or H200): one JSON line per figure.
#   bash bench/gpu.sh               dit_large on the GPU
#   bash bench/gpu.sh --cpu-smoke   the same steps with the demo model on the CPU, to know the script works
# H200 seconds per step (estimates from the last lent run: 226 s for steps 1, 3 and eval) in brackets:
# 1. compiled dit_large training step (forward + backward, bf16): MFU at the largest batch that fits      [~70]
# 2. the same step with attention forced to cuDNN, then flash: the kernel A/B (CPU smoke: math, eager)   [2 x ~55]
# 3. the whole train.py step at that batch (data, optimizer, EMA, logging), parallel='ddp' and 'fsdp':
#    overhead over step 1                                                                                 [~100]
# 4. sample.py's path at COCO val2017 scale (5,000 images): midpoint 10 steps without and with guidance,
#    compiled; start-up apart; MFU on the FLOPs executed                                                  [~110]
# 5. extract.py's pipeline against the two towers' forward (ViT-L-14-quickgelu + EVA02-E-14-plus, random
#    weights, 2,048 images)                                                                               [~50]
# 6. eval.py's two tasks at COCO val scale on the GPU                                                     [~15]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = "--cpu-smoke" ]; then
  CONFIG=config/demo.py; BATCHES="64 32"; DEV=(--device=cpu --dtype=float32); EVAL=(--device=cpu --n_images=500)
  SAMPLE=(--sample_batch_size=16 --throughput_batches=1 --coco_images=64); STEPS=(--warmup_steps=1 --steps=2)
  ATTENTION="math"; AB=(--compile=False --warmup_steps=1 --steps=2); EXTRACT=(--gpu=False --images=256)
  LIMIT=300; AB_LIMIT=300; SAMPLE_LIMIT=300; EXTRACT_LIMIT=300
else
  CONFIG=config/dit_large.py; BATCHES="64 48 32 24 16"; DEV=(--dtype=bfloat16); EVAL=(--device=cuda)
  SAMPLE=(--sample_batch_size=128 --throughput_batches=2); STEPS=(--warmup_steps=3 --steps=10)
  ATTENTION="cudnn flash"; AB=(--compile=True --warmup_steps=2 --steps=5); EXTRACT=(--gpu=True --images=2048)
  LIMIT=240; AB_LIMIT=120; SAMPLE_LIMIT=200; EXTRACT_LIMIT=150
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
run() { timeout "$LIMIT" "$PY" "$@"; }
failed() { echo "{\"bench\": \"$1\", \"failed\": \"$(tail -c 200 "$2" | tr '\n"' ' ')\"}"; }

batch=
for b in $BATCHES; do  # the largest batch whose compiled step fits in memory
  if model=$(run bench/bench_model.py "$CONFIG" --compile=True --batch_size="$b" "${DEV[@]}" "${STEPS[@]}" \
              2>/tmp/gpu_bench_model.err | tail -n 1); then
    echo "$model"; batch=$b; break
  fi
  echo "{\"bench\": \"model\", \"batch_size\": $b, \"failed\": \"$(tail -c 200 /tmp/gpu_bench_model.err | tr '\n"' ' ')\"}"
done
[ -n "$batch" ] || { echo '{"bench": "gpu.sh", "error": "no batch fits"}'; exit 1; }
for attention in $ATTENTION; do  # step 1 ran 'auto' (model.SDPA_PRIORITY: cuDNN first)
  LIMIT=$AB_LIMIT run bench/bench_model.py "$CONFIG" --batch_size="$batch" --attention="$attention" "${DEV[@]}" \
      "${AB[@]}" 2>/tmp/gpu_bench_attention.err | grep "^{" || failed "model attention=$attention" /tmp/gpu_bench_attention.err
done
# both parallel modes (FSDP over a group of one: its machinery's cost); overhead against step 1's ms/step
step_ms=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["ms_per_step"])' "$model")
run bench/bench_train.py "$CONFIG" --compile=True --batch_size="$batch" --gradient_accumulation_steps=2 \
    --bench_warmup=3 --bench_iters=5 --model_ms_per_step="$step_ms" "${DEV[@]}" 2>/tmp/gpu_bench_train.err \
    | grep "^{" || failed train /tmp/gpu_bench_train.err

# one line without guidance, one with (bench_sample.py's guided_cfg_scale)
LIMIT=$SAMPLE_LIMIT run bench/bench_sample.py "$CONFIG" --quality=False --compile=True "${SAMPLE[@]}" "${DEV[@]}" \
    2>/tmp/gpu_bench_sample.err | grep '^{' || failed sample /tmp/gpu_bench_sample.err
LIMIT=$EXTRACT_LIMIT run bench/bench_extract.py "${EXTRACT[@]}" 2>/tmp/gpu_bench_extract.err | grep "^{" \
    || failed extract /tmp/gpu_bench_extract.err
run bench/bench_eval.py "${EVAL[@]}" | tail -n 1
