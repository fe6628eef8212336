#!/usr/bin/env bash
# Issue 18: Gemma 3's intents rows that were scored on the GPU before the scoring fix
# (src/slimtune/model/masks.py), measured again in one call, side by side on the one GPU:
# 1. lr_sweep.py at the rates other than each method's default (the defaults' rows are
#    gpu_scoring_fix.sh's), seeds 0-2;
# 2. salf_validation.py, LoRA at its default rate, freeze-below KS, seeds 0-2, no timing
#    pass (runs that share a GPU say nothing about step time).
#   after PART=tf and PART=gw1..gw4 of gpu_models.sh, carry .whl2:
#   BUDGET_S=520 bash benchmarks/gpu_gemma_intents.sh
export GEMMA_ONLY=1
source benchmarks/gpu_models.sh
lrs=${LRS:-lora=3e-4,3e-3;sparse=3e-4,1e-3;rosa=3e-4,1e-3;shira=1e-3;experts=3e-4}
mkdir -p /tmp/gi
timeout "${BUDGET_S:-520}" python3 benchmarks/salf_validation.py --model gemma3-270m \
  --task intents --freeze-below "${KS:-0,3,6,9,12}" --seeds 0,1,2 --steps 100 --device cuda \
  --lr default --jobs "${SALF_JOBS:-15}" --timing-steps 0 --out /tmp/gi/salf \
  > /tmp/gi/salf.out 2> /tmp/gi/salf.log &
salf=$!
timeout "${BUDGET_S:-520}" python3 benchmarks/lr_sweep.py --device cuda --models gemma3-270m \
  --tasks intents --methods lora,sparse,rosa,shira,experts --method-lrs "$lrs" \
  --seeds 0,1,2 --jobs "${JOBS:-24}" --out /tmp/gi/sweep > /tmp/gi/sweep.log 2>&1 \
  || echo "sweep stopped" >> /tmp/gi/sweep.log
wait "$salf" || echo "salf stopped" >> /tmp/gi/salf.log
cp /tmp/gi/sweep/results.jsonl "$out/sweep.jsonl" || true
cp /tmp/gi/salf.log "$out/salf.log"
cp /tmp/gi/salf/salf_validation.json "$out/salf.json" 2>/dev/null \
  || cp /tmp/gi/salf/quality_runs.json "$out/salf-quality.json" 2>/dev/null || true
tail -n 3 /tmp/gi/sweep.log; tail -n 20 /tmp/gi/salf.out
[ -f "$out/sweep.jsonl" ] && python3 benchmarks/lr_sweep.py --table "$out/sweep.jsonl"
