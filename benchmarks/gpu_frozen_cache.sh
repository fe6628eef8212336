#!/usr/bin/env bash
# train --cache-frozen on a GPU: the 1.24B Llama shape's step with the bottom half frozen,
# its frozen layers run (lora-freeze-half) or skipped because every example of the batch
# is kept (lora-freeze-half+cached: what every step after an example's first sight runs),
# against issue 14's peer for a frozen run, peft + Liger on the top half. ROUNDS rounds of
# CONFIGS, the order reversed every other round; each row its own process (bench_methods).
# One device call, carry .whl (liger-kernel):
#   ROUNDS=2 bash benchmarks/gpu_frozen_cache.sh
set -euo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
configs=${CONFIGS:-peft-lora-bf16-liger-top-half,lora-freeze-half,lora-freeze-half+cached,full-freeze-half,full-freeze-half+cached}
for i in $(seq "${ROUNDS:-2}"); do
  order=$configs
  [ $(( i % 2 )) = 0 ] && order=$(echo "$configs" | tr , '\n' | tac | paste -sd,)
  left=$(( ${CALL_S:-560} - SECONDS )); [ "$left" -gt 60 ] || { echo "out of time"; exit 0; }
  echo "== round $i: $order"
  timeout "$left" python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b \
    --batch 4 --seq 2048 --steps 10 --warmup 3 --lora-r 16 \
    --baseline peft-lora-bf16-liger-top-half --configs "$order" \
    --out "$out/round$i.json" 2>"$out/round$i.log" | grep "^|" || { echo stopped; tail -5 "$out/round$i.log"; }
done
