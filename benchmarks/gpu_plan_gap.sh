#!/usr/bin/env bash
# Why plan's typical step falls under train's median on a GPU (issue 18), after the staging
# calls in gpu_models.sh (PART=tf, mw1, mw2):  bash benchmarks/gpu_plan_gap.sh
source benchmarks/gpu_models.sh
cd /tmp
for spec in "full 7 auto" "full 7 1e-4" "lora 13 1e-3" "lora 0 1e-3"; do
  set -- $spec
  timeout 120 python3 "$OLDPWD/benchmarks/train_step_phases.py" --device cuda --method $1 \
    --freeze-below $2 --lr $3 2>>"$out/phases.log" | tee -a "$out/phases.txt" || true
done
