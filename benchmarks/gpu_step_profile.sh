#!/usr/bin/env bash
# Where a small model's LoRA step goes on a GPU (issue 18's plan table: 0.27-0.40 s per LoRA
# step of the default model, 3-4x full fine-tuning of layers 7-29, not shortened by
# freezing). After the staging calls of gpu_models.sh (mw1, mw2, tf):
#   bash benchmarks/gpu_step_profile.sh
# 1. slimtune train itself, profiled over 3 steps after 6 (benchmarks/step_profile.py), on
#    the bundled extraction data: full at 7, lora, lora at 13, and lora without Liger
#    (SLIMTUNE_KERNELS=off) and without dropout;
# 2. the same methods on fixed-shape batches (bench_methods.py, 8 x 96), each in its own process.
source benchmarks/gpu_models.sh
common=(--model default --data builtin:support_extract_train --eval-fraction 0.02
        --max-steps 10 --device cuda --no-store --no-progress --overwrite)
profile_run() {  # name, env assignments (or -), then train flags
  local name=$1 envs=$2; shift 2
  local left=$(( ${CALL_S:-590} - SECONDS - 90 ))
  [ "$left" -gt 30 ] || { echo "$name: no time left"; return 0; }
  echo "== $name" | tee -a "$out/summary.txt"
  env ${envs/#-/} timeout "$left" python3 benchmarks/step_profile.py --skip 6 --active 3 \
    --trace "$out/trace-$name.json" -- "${common[@]}" --output-dir "/tmp/prof-$name" "$@" \
    >"$out/profile-$name.txt" 2>"$out/profile-$name.log" || echo "$name failed: $(tail -2 "$out/profile-$name.log")"
  grep -A1 "^profiled steps" "$out/profile-$name.txt" | tee -a "$out/summary.txt" || true
  gzip -f "$out/trace-$name.json" 2>/dev/null || true
}
profile_run full7 - --method full --freeze-below 7 --lr 1e-4
profile_run lora - --method lora --lr 1e-3
profile_run lora13 - --method lora --freeze-below 13 --lr 1e-3
profile_run lora-nokernels SLIMTUNE_KERNELS=off --method lora --lr 1e-3
profile_run lora-nodropout - --method lora --lr 1e-3 --lora-dropout 0
left=$(( ${CALL_S:-590} - SECONDS - 10 ))
[ "$left" -gt 60 ] || { echo "bench: no time left"; exit 0; }
timeout "$left" python3 benchmarks/bench_methods.py --model default --device cuda --batch 8 \
  --seq 96 --steps 10 --configs "${BENCH:-full,lora,lora-freeze-half,lora-dropout0.05,peft-lora}" \
  --out "$out/bench.json" 2>"$out/bench.log" | tee "$out/bench.md" || echo "bench stopped"
