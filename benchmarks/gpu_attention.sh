#!/usr/bin/env bash
# SDPA without cuDNN's attention (SLIMTUNE_ATTENTION=auto, the default) against torch's own
# choice (SLIMTUNE_ATTENTION=torch: cuDNN on Hopper) on a lent GPU, after the staging calls
# of gpu_models.sh (mw1, mw2, tf):
#   bash benchmarks/gpu_attention.sh
# Each slimtune train run of the default model took 60-130 s on the lent hosts (load, eval).
# 1. slimtune train on the bundled extraction data (batches of varying width), 30 steps, the
#    median step and the generation latency of its evaluation, for full at 7, lora, lora at
#    13, and lora without Liger; both settings, one after the other, in one call;
# 2. fixed shapes (bench_methods.py): the default model at 8 x 96, the 1.24B shape at 4 x 2048.
source benchmarks/gpu_models.sh
common=(--model default --data builtin:support_extract_train --eval-fraction 0.05
        --max-steps 30 --device cuda --no-store --no-progress --overwrite)
echo "| run | SLIMTUNE_ATTENTION | step p50 (s) | tokens/s | decode p50 (ms) | eval examples |" | tee "$out/train.md"
echo "|---|---|---|---|---|---|" | tee -a "$out/train.md"
train_run() {  # name, attention, extra env (or -), train flags
  local name=$1 attn=$2 envs=$3; shift 3
  local dir=/tmp/att-$name-$attn left=$(( ${CALL_S:-590} - SECONDS - 30 ))
  [ "$left" -gt 60 ] || { echo "$name $attn: no time left"; return 0; }
  env SLIMTUNE_ATTENTION=$attn ${envs/#-/} timeout $(( left < 150 ? left : 150 )) python3 -m slimtune train "${common[@]}" \
    --output-dir "$dir" "$@" >"$out/train-$name-$attn.log" 2>&1 || { echo "$name $attn failed"; tail -3 "$out/train-$name-$attn.log"; return 0; }
  python3 - "$dir/summary.json" "$name" "$attn" <<'PY' | tee -a "$out/train.md" || true
import json, sys
s = json.load(open(sys.argv[1]))
nan = float("nan")
print(f"| {sys.argv[2]} | {sys.argv[3]} | {s.get('step_time_p50_s') or nan:.3f} | "
      f"{s.get('tokens_per_s') or nan:,.0f} | {s.get('eval_latency_p50_ms') or nan:.1f} | "
      f"{s.get('eval_examples')} |")
PY
}
for attn in torch auto; do
  train_run full7 $attn - --method full --freeze-below 7 --lr 1e-4
  train_run lora $attn - --method lora --lr 1e-3
  train_run lora13 $attn - --method lora --freeze-below 13 --lr 1e-3
  train_run lora-noliger $attn SLIMTUNE_KERNELS=off --method lora --lr 1e-3
done
for attn in torch auto; do
  left=$(( ${CALL_S:-590} - SECONDS - 10 ))
  [ "$left" -gt 60 ] || { echo "bench default $attn: no time left"; continue; }
  SLIMTUNE_ATTENTION=$attn timeout $(( left < 240 ? left : 240 )) python3 benchmarks/bench_methods.py --model default --device cuda \
    --batch 8 --seq 96 --steps 10 --configs full,lora,lora-freeze-half \
    --out "$out/bench-default-$attn.json" 2>"$out/bench-default-$attn.log" | tee "$out/bench-default-$attn.md" || echo "bench default $attn stopped"
done
left=$(( ${CALL_S:-590} - SECONDS - 5 ))
for attn in torch auto; do
  [ "$left" -gt 120 ] || { echo "bench 1b $attn: no time left"; continue; }
  SLIMTUNE_ATTENTION=$attn timeout $(( left / 2 )) python3 benchmarks/bench_methods.py --model llama-1.2b --device cuda \
    --batch 4 --seq 2048 --steps 5 --configs lora \
    --out "$out/bench-1b-$attn.json" 2>"$out/bench-1b-$attn.log" | tee "$out/bench-1b-$attn.md" || echo "bench 1b $attn stopped"
done
