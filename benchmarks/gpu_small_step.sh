#!/usr/bin/env bash
# Where a small model's GPU step and decode go (issue 14): the default model's shape with
# random weights, so nothing is staged but .whl2 (liger-kernel, rich):
#   bash benchmarks/gpu_small_step.sh      # carry .whl2
# 1. decode_profile.py: per-token decode, plain and unmerged LoRA, cuDNN on/off, a profile;
# 2. bench_methods.py at 8 x 128: the LoRA variants, full, freezing, compiled, with profiles.
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
left() { echo $(( ${CALL_S:-590} - SECONDS - 10 )); }
timeout $(( $(left) < 150 ? $(left) : 150 )) python3 benchmarks/decode_profile.py --device cuda \
  >"$out/decode.txt" 2>&1 || echo "decode_profile stopped"
head -12 "$out/decode.txt"
timeout $(( $(left) )) python3 benchmarks/bench_methods.py --model smollm2-135m --device cuda \
  --batch 8 --seq 128 --steps 20 --warmup 3 --lora-r 8 \
  --configs "${CONFIGS:-peft-lora-bf16,lora,lora-unfused,lora-dropout0.05,full,full-freeze-half,lora-freeze-half,lora+compile}" \
  ${PROFILE:+--profile} --out "$out/small.json" >"$out/small.md" 2>"$out/small.log" || echo "bench stopped"
grep '^|' "$out/small.md" | head -20
