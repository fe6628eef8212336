#!/usr/bin/env bash
# SALF validation on a lent GPU (see gpu_models.sh for the calls that bring both packaged
# models and transformers 5.24 first): LoRA at its default rate, several freeze-below
# values, three seeds each, runs side by side, then each freeze-below timed alone.
# One model and task per call fits the 10-minute limit:
#   COMBOS=default:extract bash benchmarks/gpu_salf.sh      (also gemma3-270m:intents, ...)
#   KS_default=0,5,10,13,15,20 (30 layers)  KS_gemma=0,3,6,9,12,15 (18 layers)
#   LR=3e-3: every cut at that rate instead of the method's default (LR=auto: the range test)
#   TIMING_ROUNDS=2 (the script's default is 3; a 10-minute call holds about 2 on extract)
#   TIMING_STEPS=0: no timing pass (the quality runs' shared-device step times instead)
#   PARALLEL=1: the COMBOS side by side (JOBS runs each), not in turn; their step times
#   are then shared-device ones (say so beside any table)
source benchmarks/gpu_models.sh
one_combo() {
  local combo=$1 model task ks dir left
  model=${combo%%:*} task=${combo##*:}
  if [ "$model" = default ]; then ks=${KS_default:-0,5,10,13,15,20}; else ks=${KS_gemma:-0,3,6,9,12,15}; fi
  dir=/tmp/salf-$model-$task
  left=$(( ${CALL_S:-590} - SECONDS ))  # what the call has left, its start and the fetch paid
  timeout "$left" python3 benchmarks/salf_validation.py --model "$model" --task "$task" \
    --freeze-below "$ks" --seeds "${SEEDS:-0,1,2}" --steps "${STEPS:-100}" --device cuda \
    --lr "${LR:-default}" \
    --jobs "${JOBS:-12}" --timing-steps "${TIMING_STEPS:-20}" --timing-rounds "${TIMING_ROUNDS:-2}" \
    --out "$dir" 2>"$dir.log" \
    | tail -14 || { echo "$combo stopped"; tail -3 "$dir.log"; }
  cp "$dir.log" "$out/salf-$model-$task.log"  # every run's row, finished or not
  cp "$dir/salf_validation.json" "$out/salf-$model-$task.json" 2>/dev/null \
    || cp "$dir/quality_runs.json" "$out/salf-$model-$task-quality.json" 2>/dev/null || true
}
pids=()
for combo in ${COMBOS:-default:extract}; do
  if [ "${PARALLEL:-0}" = 1 ]; then one_combo "$combo" & pids+=($!); else one_combo "$combo"; fi
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed combo fails the script (set -e)
