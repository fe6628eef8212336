#!/usr/bin/env bash
# --lr auto and two quality checks on a lent GPU; gpu_models.sh's calls bring both models
# first (PART=tf, then PART=mw1 ... PART=gw4: the image's transformers 5.17 converts both
# models' tokenizers wrongly, which slimtune refuses; this session's PHASE=auto/gemma/nf4
# calls ran before that check, without PART=tf), then one or more calls of this script
# (carry .whl: only
# its bitsandbytes is installed). Runs resume from /tmp/lr_sweep/results.jsonl on the
# same machine:
#   PHASE=auto   slimtune train --lr auto (SEEDS, default 0) for every method, task and
#                model; the range test's curve is kept in each row (lr_sweep.py, rate auto)
#   PHASE=nf4    sparse at its default rate on the nf4 base and on the bf16 base, default
#                model, both tasks, seeds 0-4 (issue 15's quality bar)
#   PHASE=gemma  Gemma 3 on the GPU: LoRA on intents at --precision fp32 and with torch's
#                math attention, and the delta a CPU run trained (carry runs/gemma_cpu_lora)
#                evaluated here (bf16) (issue 18: Gemma scores low on GPUs only)
source benchmarks/gpu_models.sh
# bitsandbytes only: without Liger, as the learning-rate sweep these runs are compared with
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .whl/bitsandbytes-*.whl 2>&1 | tail -1 || true
mkdir -p /tmp/lr_sweep
sweep() { timeout "${BUDGET_S:-540}" python3 benchmarks/lr_sweep.py --device cuda \
  --jobs "${JOBS:-8}" --out /tmp/lr_sweep "$@" 2>/dev/null | tail -40 || echo "stopped"; }
case "${PHASE:-auto}" in
  auto)
    sweep --seeds "${SEEDS:-0}" --method-lrs \
      'lora=auto;sparse=auto;rosa=auto;shira=auto;experts=auto;full=auto' ;;
  nf4)
    sweep --models default --methods sparse --method-lrs 'sparse=default' --seeds 0,1,2,3,4
    sweep --models default --methods sparse --method-lrs 'sparse=default' --seeds 0,1,2,3,4 \
      --tag nf4 --flags '--quantize nf4' ;;
  gemma)
    mkdir -p /tmp/mathsdp
    printf 'import torch\ntorch.backends.cuda.enable_flash_sdp(False)\ntorch.backends.cuda.enable_mem_efficient_sdp(False)\ntorch.backends.cuda.enable_cudnn_sdp(False)\n' \
      > /tmp/mathsdp/sitecustomize.py
    common="--model gemma3-270m --data builtin:support_intents_train --eval-data
      builtin:support_intents_test --method lora --device cuda --save-every 0 --no-store
      --no-progress --overwrite"
    python3 -m slimtune train $common --output-dir /tmp/g/bf16 > /tmp/g-bf16.log 2>&1 &
    python3 -m slimtune train $common --precision fp32 --output-dir /tmp/g/fp32 \
      > /tmp/g-fp32.log 2>&1 &
    PYTHONPATH=/tmp/mathsdp:$PYTHONPATH python3 -m slimtune train $common \
      --output-dir /tmp/g/math > /tmp/g-math.log 2>&1 &
    wait
    for v in bf16 fp32 math; do
      echo "$v: $(python3 -c "import json; s=json.load(open('/tmp/g/$v/summary.json')); print(s['eval_accuracy'], s['eval_loss'], s['final_train_loss'])" 2>&1 | tail -1)"
      cp /tmp/g/$v/metrics.jsonl "$out/gemma-$v-metrics.jsonl" 2>/dev/null || tail -3 /tmp/g-$v.log
    done
    python3 -m slimtune eval --model gemma3-270m --delta runs/gemma_cpu_lora \
      --data builtin:support_intents_test --device cuda --no-latency \
      --output "$out/gemma-cpu-delta.json" 2>&1 | tail -3 ;;
esac
cp /tmp/lr_sweep/results.jsonl "$out/" 2>/dev/null || true
