#!/usr/bin/env bash
# Why does `slimtune train` with LoRA r8 step slower than r16 on a GPU on the bundled intents
# (BENCHMARKS.md, "Timed on mixes as wide as the model": 0.184 against 0.146 s, and in every
# intents run of that table), when plan's calibration times r8 the cheaper? One call, after
# the staging calls of gpu_models.sh (PART=tf, mw1, mw2):
#   bash benchmarks/gpu_lora_rank.sh            # DATA=builtin:support_extract_train for the other task
# 1. the two ranks alternately, r8 r16 r8 r16, each its own process: order or rank?
# 2. each rank under the profiler (benchmarks/step_profile.py, 10 steps after 10): GPU busy
#    share, launches, syncs, and the kernels by device time, side by side.
source benchmarks/gpu_models.sh
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
data=${DATA:-builtin:support_intents_train}
common=(--model default --data "$data" --method lora --device cuda --batch-size 8
  --eval-fraction 0 --save-every 0 --no-progress --no-store --overwrite)
rank_args() { echo "--lora-r $1 --lora-alpha $(( 2 * $1 ))"; }
for r in 8 16 8 16; do
  python3 -m slimtune train "${common[@]}" $(rank_args $r) --max-steps 42 \
    --output-dir /tmp/rank/r$r > "$out/train-r$r.log" 2>&1 || { echo "r$r failed"; continue; }
  python3 - "$r" <<'PY'
import json, statistics, sys
log = [json.loads(x) for x in open(f"/tmp/rank/r{sys.argv[1]}/metrics.jsonl") if '"step_time_s"' in x]
times = [x["step_time_s"] for x in log[2:]]
med = statistics.median(times)
print(f"r{sys.argv[1]}: median of {len(times)} steps {med:.4f} s, fastest {min(times):.4f} s, "
      f"slowest {max(times):.4f} s, {sum(t > 1.5 * med for t in times)} over 1.5x the median; "
      f"first 10: {' '.join(f'{t:.3f}' for t in times[:10])}")
PY
done
for r in 8 16; do
  python3 benchmarks/step_profile.py --skip 10 --active 10 -- "${common[@]}" $(rank_args $r) \
    --max-steps 22 --output-dir /tmp/rank/p$r > "$out/profile-r$r.txt" 2>"$out/profile-r$r.log" \
    || { echo "profile r$r failed"; tail -5 "$out/profile-r$r.log"; continue; }
  echo "== r$r"; grep -A1 "^profiled steps" "$out/profile-r$r.txt"
  sed -n '/by device time/,$p' "$out/profile-r$r.txt" | head -20
done
