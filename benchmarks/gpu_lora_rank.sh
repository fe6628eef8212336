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
rank_args() { echo "--lora-r $1 --lora-alpha $(( 2 * $1 ))"; }
for r in 8 16 8 16; do  # one JSON line each: median, mean, longest step (train_gc.py)
  echo -n "r$r: "
  python3 benchmarks/train_gc.py -- "${small_lora[@]}" $(rank_args $r) --max-steps 42 \
    --output-dir /tmp/rank/r$r 2>"$out/train-r$r.log" | tail -1 || echo "failed"
done
for r in 8 16; do
  python3 benchmarks/step_profile.py --skip 10 --active 10 -- "${small_lora[@]}" $(rank_args $r) \
    --max-steps 22 --output-dir /tmp/rank/p$r > "$out/profile-r$r.txt" 2>"$out/profile-r$r.log" \
    || { echo "profile r$r failed"; tail -5 "$out/profile-r$r.log"; continue; }
  echo "== r$r"; grep -A1 "^profiled steps" "$out/profile-r$r.txt"
  sed -n '/by device time/,$p' "$out/profile-r$r.txt" | head -20
done
