#!/usr/bin/env bash
# LoRA's per-layer host cost on a GPU, before and after a change of lora_fused, in one call:
# the code before it is exported to .old and carried beside the working tree, with .whl2:
#   mkdir .old && git archive 2266237 src benchmarks | tar -x -C .old   # (BENCHMARKS.md's run)
#   bash benchmarks/gpu_lora_host.sh
# Rows alternate old/new so host drift falls on both. Shapes: the default model's (135M,
# 8 x 128) and the 1.24B Llama's at short (8 x 128) and long (4 x 2048) batches.
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
export PYTHONPATH=/tmp/site PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
left() { echo $(( ${CALL_S:-590} - SECONDS - 10 )); }
bench() {  # tree (. or .old), name, bench_methods args
  local tree=$1 name=$2; shift 2
  [ "$(left)" -gt 40 ] || { echo "$name: no time left"; return 0; }
  timeout $(( $(left) < 200 ? $(left) : 200 )) python3 "$tree/benchmarks/bench_methods.py" --device cuda "$@" \
    --out "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log" || echo "$name stopped"
  echo "== $name"; grep '^| [a-z]' "$out/$name.md" | grep -v '^| config' || true
}
small=(--model smollm2-135m --batch 8 --seq 128 --steps 20 --warmup 3 --lora-r 8)
for round in 1 2; do
  bench .old "small-old-$round" "${small[@]}" --configs lora,lora-freeze-half,lora-dropout0.05
  bench . "small-new-$round" "${small[@]}" --configs lora,lora-freeze-half,lora-dropout0.05
done
bench . small-peer "${small[@]}" --configs peft-lora-bf16,full
short=(--model llama-1.2b --batch 8 --seq 128 --steps 10 --warmup 3 --lora-r 16)
bench .old short-old "${short[@]}" --configs lora
bench . short-new "${short[@]}" --configs lora,peft-lora-bf16-liger
bench .old short-old-2 "${short[@]}" --configs lora
long=(--model llama-1.2b --batch 4 --seq 2048 --steps 10 --warmup 3 --lora-r 16)
bench .old long-old "${long[@]}" --configs lora
bench . long-new "${long[@]}" --configs lora,peft-lora-bf16-liger
[ "$(left)" -gt 100 ] && timeout $(( $(left) )) python3 benchmarks/decode_profile.py --device cuda \
  >"$out/decode.txt" 2>&1 || echo "decode_profile stopped"
grep '^|' "$out/decode.txt" || true
