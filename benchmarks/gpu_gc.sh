#!/usr/bin/env bash
# Python's garbage collector and a small model's GPU step (issue 18): `slimtune train` of
# the code before steady_gc (.old = `git archive <commit> src benchmarks`, carried) and now,
# alternately, then plan's calibration in the order plan_accuracy runs it, before and now.
# One call after PART=tf, mw1, mw2 of gpu_models.sh:
#   bash benchmarks/gpu_gc.sh                  # carry .old
source benchmarks/gpu_models.sh
old_and_new_train 3
for code in old new; do
  root=$PWD; [ $code = old ] && root=$PWD/.old
  echo "== calibration, $code code"
  PYTHONPATH=/tmp/site:$root/src timeout $(( ${CALL_S:-590} - SECONDS )) python3 \
    "$root/benchmarks/plan_drift.py" --device cuda --data "${DATA:-builtin:support_intents_train}" \
    --order "${ORDER:-lora-r16,lora-r8,full,lora-r16}" 2>"$out/drift-$code.log" \
    || { echo "stopped"; tail -3 "$out/drift-$code.log"; }
done
