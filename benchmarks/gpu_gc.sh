#!/usr/bin/env bash
# Python's garbage collector and a small model's GPU step (issue 18): `slimtune train` of
# the code before steady_gc (.old = `git archive <commit> src benchmarks`, carried) and now,
# alternately, then plan's calibration in the order plan_accuracy runs it, before and now.
# One call after PART=tf, mw1, mw2 of gpu_models.sh:
#   bash benchmarks/gpu_gc.sh                  # carry .old
source benchmarks/gpu_models.sh
data=${DATA:-builtin:support_intents_train}
common=(--model default --data "$data" --method lora --device cuda --batch-size 8
  --eval-fraction 0 --save-every 0 --no-progress --no-store --overwrite --max-steps 42)
cp benchmarks/plan_drift.py benchmarks/train_gc.py .old/benchmarks/
for i in 1 2 3; do
  for code in old new; do
    root=$PWD; [ $code = old ] && root=$PWD/.old
    echo -n "$code: "
    PYTHONPATH=/tmp/site:$root/src python3 "$root/benchmarks/train_gc.py" -- "${common[@]}" \
      --output-dir /tmp/gc/$code$i 2>"$out/train-$code$i.log" | tail -1 \
      || { echo "failed"; tail -3 "$out/train-$code$i.log"; }
  done
done
for code in old new; do
  root=$PWD; [ $code = old ] && root=$PWD/.old
  echo "== calibration, $code code"
  PYTHONPATH=/tmp/site:$root/src timeout $(( ${CALL_S:-590} - SECONDS )) python3 \
    "$root/benchmarks/plan_drift.py" --device cuda --data "$data" \
    --order "${ORDER:-lora-r16,lora-r8,full,lora-r16}" 2>"$out/drift-$code.log" \
    || { echo "stopped"; tail -3 "$out/drift-$code.log"; }
done
