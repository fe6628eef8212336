#!/usr/bin/env bash
# Is a host-bound GPU step set by the CPUs its process runs on? LoRA r8 on the default
# model's shape (random weights, batch 8 x 128: the GPU is idle most of a step), one process
# per run, unpinned and pinned (taskset) to each NUMA node's CPUs, or to either half of
# the CPUs where there is one node, ROUNDS rounds in turn. One call, carry .whl:
#   ROUNDS=3 bash benchmarks/gpu_cpu_affinity.sh
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
nvidia-smi topo -m | head -4
lscpu | grep -E "Model name|Socket|NUMA|MHz" ; grep Cpus_allowed_list /proc/self/status
nodes=$(lscpu -p=CPU,NODE | grep -v '^#' | awk -F, '{print $2}' | sort -u | wc -l)
if [ "$nodes" -gt 1 ]; then
  pins=$(for n in $(lscpu -p=CPU,NODE | grep -v '^#' | awk -F, '{print $2}' | sort -u); do
    lscpu -p=CPU,NODE | grep -v '^#' | awk -F, -v n="$n" '$2==n{print $1}' | paste -sd, ; done)
else  # either half of the CPUs this process may use
  mine=($(python3 -c "import os; print(*sorted(os.sched_getaffinity(0)))"))
  half=$(( ${#mine[@]} / 2 ))
  pins="$(IFS=,; echo "${mine[*]:0:half}") $(IFS=,; echo "${mine[*]:half}")"
fi
echo "pin sets: none $pins"
for r in $(seq "${ROUNDS:-3}"); do
  for pin in none $pins; do
    cmd=(python3 benchmarks/bench_methods.py --device cuda --model smollm2-135m --batch 8 --seq 128
      --steps 30 --warmup 3 --lora-r 8 --configs lora)
    [ "$pin" = none ] || cmd=(taskset -c "$pin" "${cmd[@]}")
    left=$(( ${CALL_S:-580} - SECONDS )); [ "$left" -gt 0 ] || { echo "out of time"; exit 0; }
    echo -n "round $r, cpus $pin: "
    # the machine line says how many threads torch ran on: kept beside the step time
    timeout "$left" "${cmd[@]}" 2>>"$out/err.log" | tee -a "$out/runs.md" \
      | grep "^| lora" | awk -F'|' '{print $4}' || echo "stopped"
  done
done
