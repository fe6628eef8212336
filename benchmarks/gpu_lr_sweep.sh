#!/usr/bin/env bash
# The learning-rate sweep (lr_sweep.py) on a lent GPU, both packaged models, both bundled
# tasks (see gpu_models.sh for the calls that bring the models). Resumes from
# /tmp/lr_sweep when a call runs out of time, or from runs/lr_sweep/results.jsonl when
# that is carried to a fresh machine; SWEEP_ARGS adds or overrides options.
source benchmarks/gpu_models.sh
mkdir -p /tmp/lr_sweep
if [ ! -f /tmp/lr_sweep/results.jsonl ] && [ -f runs/lr_sweep/results.jsonl ]; then
  cp runs/lr_sweep/results.jsonl /tmp/lr_sweep/
fi
timeout "${BUDGET_S:-500}" python3 benchmarks/lr_sweep.py --device cuda --jobs "${JOBS:-8}" \
  --out /tmp/lr_sweep ${SWEEP_ARGS:-} || echo "stopped (resume with another call)"
cp /tmp/lr_sweep/results.jsonl "$out/"
python3 benchmarks/lr_sweep.py --table /tmp/lr_sweep/results.jsonl
