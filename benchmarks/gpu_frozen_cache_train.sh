#!/usr/bin/env bash
# train --cache-frozen on a lent GPU, after PART=tf, mw1, mw2 of gpu_models.sh (carry
# .whl3, .mw1, then .mw2 .whl2):
#   bash benchmarks/gpu_frozen_cache_train.sh
# 1. bench_methods.py, the 1.24B Llama shape at 4 x 2048, bottom half frozen: frozen layers
#    run, skipped with the states kept on the GPU (+cached, where train keeps a cache this
#    size), skipped with them in host memory (+cached+host); every layer for the ratio;
# 2. frozen_cache_train.py: `slimtune train` of the default model on the bundled intents,
#    EPOCHS epochs (3), every layer / freeze-below 10 / the same with --cache-frozen.
#  SEEDS="0 1 2" bash benchmarks/gpu_frozen_cache_train.sh   # instead: per seed, every
#    layer against --freeze auto --cache-frozen, 3 epochs each (step 2 alone)
#  CUTS="6 10" TASK=extract SEEDS="0 1 2" PARALLEL=1 bash benchmarks/gpu_frozen_cache_train.sh
#    instead: the seeds side by side (one process each; their step times are not
#    comparable, their scores are), each every layer and then each cut with --cache-frozen;
#    LRS="1.5e-3 2e-3": each cut at each rate (default: the method's); RANKS="12 16": each
#    cut at each LoRA rank (default: the method's); ALL_LAST=1: every layer after the cuts;
#    ALL_FLAGS="--lora-r 16": the every-layer run's own flags
source benchmarks/gpu_models.sh
if [ -n "${PARALLEL:-}" ]; then
  all_layers() {
    local seed=$1 left
    left=$(( ${CALL_S:-560} - SECONDS )); [ "$left" -gt 30 ] || return 0
    timeout "$left" python3 benchmarks/frozen_cache_train.py --device cuda --task "${TASK:-intents}" \
      --epochs "${EPOCHS:-3}" --seed "$seed" --runs "all layers" --out "/tmp/fcp-$seed-all" \
      --extra "${ALL_FLAGS:-}" \
      2>"$out/seed$seed-all.log" | grep "^| all" || { echo "seed $seed: all stopped"; tail -3 "$out/seed$seed-all.log"; }
    cp "/tmp/fcp-$seed-all/results-seed$seed.json" "$out/seed$seed-all.json" 2>/dev/null || true
  }
  one_seed() {  # every layer, then each cut at each rate of LRS, one after the other
    local seed=$1 left
    [ -n "${ALL_LAST:-}" ] || all_layers "$seed"
    for k in ${CUTS:-10}; do for lr in ${LRS:-default}; do for r in ${RANKS:-default}; do
      left=$(( ${CALL_S:-560} - SECONDS )); [ "$left" -gt 30 ] || return 0
      local rate=(); [ "$lr" = default ] || rate=(--lr "$lr")
      local rank=""; [ "$r" = default ] || rank="--lora-r $r"
      local tag="$k-$lr-r$r"
      timeout "$left" python3 benchmarks/frozen_cache_train.py --device cuda --task "${TASK:-intents}" \
        --epochs "${EPOCHS:-3}" --seed "$seed" --runs cached --freeze-below "$k" ${rate[@]+"${rate[@]}"} \
        --extra "$rank" --out "/tmp/fcp-$seed-$tag" 2>"$out/seed$seed-k$tag.log" | grep "^| cached" \
        | sed "s/^| cached/| seed $seed, freeze-below $k (cached), lr $lr, rank $r/" \
        || { echo "seed $seed k $k lr $lr rank $r: stopped"; tail -3 "$out/seed$seed-k$tag.log"; }
      cp "/tmp/fcp-$seed-$tag/results-seed$seed.json" "$out/seed$seed-k$tag.json" 2>/dev/null || true
    done; done; done
    [ -z "${ALL_LAST:-}" ] || all_layers "$seed"
  }
  for seed in ${SEEDS:-0 1 2}; do one_seed "$seed" & done
  wait
  exit 0
fi
if [ -n "${SEEDS:-}" ]; then
  for seed in $SEEDS; do
    left=$(( ${CALL_S:-560} - SECONDS )); [ "$left" -gt 60 ] || { echo "out of time"; break; }
    timeout "$left" python3 benchmarks/frozen_cache_train.py --device cuda --task intents \
      --epochs "${EPOCHS:-3}" --seed "$seed" --runs "all layers,auto cached" --out /tmp/fcs \
      2>"$out/seed$seed.log" | grep "^|" || { echo stopped; tail -5 "$out/seed$seed.log"; }
    cp /tmp/fcs/results-seed$seed.json "$out/" 2>/dev/null || true
  done
  exit 0
fi
# 0. the cache's tests, here with their CUDA cases (kept on the device and in host memory)
python3 -m pytest -q -p no:cacheprovider tests/test_frozen_cache.py 2>&1 | tail -3 || true
left=$(( ${CALL_S:-560} - SECONDS ))
timeout "$left" python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b \
  --batch 4 --seq 2048 --steps 10 --warmup 3 --lora-r 16 --baseline lora \
  --configs "${CONFIGS:-lora,lora-freeze-half,lora-freeze-half+cached,lora-freeze-half+cached+host}" \
  --out "$out/bench.json" 2>"$out/bench.log" | grep "^|" || { echo stopped; tail -5 "$out/bench.log"; }
left=$(( ${CALL_S:-560} - SECONDS ))
timeout "$left" python3 benchmarks/frozen_cache_train.py --device cuda --task intents \
  --freeze-below 10 --epochs "${EPOCHS:-3}" --out /tmp/fct 2>"$out/train.log" \
  || { echo stopped; tail -5 "$out/train.log"; }
cp /tmp/fct/results-seed0.json "$out/train.json" 2>/dev/null || true
