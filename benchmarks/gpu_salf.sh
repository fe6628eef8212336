#!/usr/bin/env bash
# SALF validation on a lent GPU: LoRA on the default model at several freeze-below values,
# three seeds each (see gpu_default_model.sh for the calls it takes).
source benchmarks/gpu_default_model.sh
for seed in 0 1 2; do
  python3 benchmarks/salf_validation.py --freeze-below "${KS:-0,10,13,15,17,20}" --lr 1e-3 \
    --seed $seed --steps 80 --out "/tmp/salf-s$seed" 2>&1 | grep -v "kernels-community" \
    | tail -14
  cp "/tmp/salf-s$seed/salf_validation.json" "$out/salf-s$seed.json"
done
