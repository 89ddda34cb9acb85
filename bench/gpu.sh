#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes on one H100 or H200): one JSON line per figure.
#   bash bench/gpu.sh               dit_large on the GPU
#   bash bench/gpu.sh --cpu-smoke   the same steps with the demo model on the CPU, to know the script works
# 1. compiled dit_large training step (forward + backward, bf16): MFU at the largest batch that fits
# 2. the whole train.py step at that batch (data, optimizer, EMA, logging): overhead over step 1
# 3. sample.py's sampler: samples/s at 50 Euler steps
# 4. eval.py's two tasks at COCO val scale on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = "--cpu-smoke" ]; then
  CONFIG=config/demo.py; BATCHES="64 32"; DEV=(--device=cpu --dtype=float32); EVAL=(--device=cpu --n_images=500)
  SAMPLE=(--sample_batch_size=16 --throughput_batches=1); STEPS=(--warmup_steps=1 --steps=2); LIMIT=300
else
  CONFIG=config/dit_large.py; BATCHES="64 48 32 24 16"; DEV=(--dtype=bfloat16); EVAL=(--device=cuda)
  SAMPLE=(--sample_batch_size=128); STEPS=(--warmup_steps=3 --steps=10); LIMIT=240
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
run() { timeout "$LIMIT" "$PY" "$@"; }

batch=
for b in $BATCHES; do  # the largest batch whose compiled step fits in memory
  if model=$(run bench/bench_model.py "$CONFIG" --compile=True --batch_size="$b" "${DEV[@]}" "${STEPS[@]}" \
              2>/tmp/gpu_bench_model.err | tail -n 1); then
    echo "$model"; batch=$b; break
  fi
  echo "{\"bench\": \"model\", \"batch_size\": $b, \"failed\": \"$(tail -c 200 /tmp/gpu_bench_model.err | tr '\n"' ' ')\"}"
done
[ -n "$batch" ] || { echo '{"bench": "gpu.sh", "error": "no batch fits"}'; exit 1; }
train=$(run bench/bench_train.py "$CONFIG" --compile=True --batch_size="$batch" --gradient_accumulation_steps=2 \
         --bench_warmup=3 --bench_iters=5 "${DEV[@]}" | tail -n 1)
echo "$train"
"$PY" -c 'import json, sys
model, train = json.loads(sys.argv[1]), json.loads(sys.argv[2])["runs"][0]
step = 2 * model["ms_per_step"]  # two micro-steps of forward + backward
print(json.dumps({"bench": "train_overhead", "batch_size": model["batch_size"], "train_ms_per_iter": train["ms_per_iter"],
                  "model_ms_for_two_micro_steps": step, "overhead": train["ms_per_iter"] / step - 1}))' "$model" "$train"

run bench/bench_sample.py "$CONFIG" --quality=False --sample_method=euler --sample_steps=50 "${SAMPLE[@]}" \
    "${DEV[@]}" | tail -n 1
run bench/bench_eval.py "${EVAL[@]}" | tail -n 1
