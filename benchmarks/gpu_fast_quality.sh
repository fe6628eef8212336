#!/usr/bin/env bash
# Issue 14's quality bar on a lent GPU: the bundled task's accuracy on the real default
# model with the default CUDA path (bf16, Liger, slimtune's fused LoRA) against the fp32
# path, every variant x seed its own `slimtune train` process, all at once on the one GPU
# (the GPU has room; the 135M model's runs are host-bound). Run after the staging calls in
# gpu_models.sh (PART=tf, mw1, mw2), then:
#   bash benchmarks/gpu_fast_quality.sh        # QUALITY, SEEDS, STEPS as in gpu_fast_path.sh
source benchmarks/gpu_models.sh
variants=${QUALITY:-"lora:--precision=auto lora-fp32:--precision=fp32"}
for seed in ${SEEDS:-0 1 2}; do
  for v in $variants; do
    name=${v%%:*}; flags=$(echo "${v#*:}" | tr ',' ' ')
    rm -rf "/tmp/q/$name-$seed"  # a row never reads an earlier call's summary
    python3 -m slimtune train --data builtin:support_intents_train \
      --eval-data builtin:support_intents_test --max-steps "${STEPS:-80}" --batch-size 8 \
      --save-every 0 --seed "$seed" --device cuda --no-store --no-progress $flags \
      --output-dir "/tmp/q/$name-$seed" >"/tmp/q-$name-$seed.log" 2>&1 \
      || echo "train failed: /tmp/q-$name-$seed.log" &
  done
done
wait
for seed in ${SEEDS:-0 1 2}; do
  for v in $variants; do
    name=${v%%:*}
    python3 benchmarks/quality_row.py "/tmp/q/$name-$seed" "$name" "$seed" "${v#*:}" \
      | tee -a "$out/quality.jsonl" || tail -5 "/tmp/q-$name-$seed.log"
  done
done
