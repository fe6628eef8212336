#!/usr/bin/env bash
# Is the spread of a host-bound GPU step between processes set inside the process (Python's
# hash seed, the address-space layout) or by the machine at the time? LoRA r8 on the default
# model's shape (random weights, batch 8 x 128: the GPU is idle most of a step), one process
# per run, 60 timed steps each read as three windows of 20 (a process steady in itself but
# unlike the next points at the process), ROUNDS rounds of: as is; PYTHONHASHSEED=0; and
# PYTHONHASHSEED=0 without address randomisation (setarch -R), the order rotated from round
# to round (BENCHMARKS.md's run kept one order; a multiple of 3 rounds puts each variant in
# each place equally often). One call, carry .whl:
#   ROUNDS=6 CALL_S=580 bash benchmarks/gpu_process_spread.sh    # BENCHMARKS.md's: ROUNDS=5 CALL_S=540
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
setarch "$(uname -m)" -R true 2>/dev/null && noaslr=(setarch "$(uname -m)" -R) \
  || { echo "setarch -R is refused here: the third variant keeps address randomisation"; noaslr=(); }
echo "| round | variant | steps 1-20 | 21-40 | 41-60 | median of 60 (s) |"
echo "|---|---|---|---|---|---|"
variants=(as-is hashseed hashseed-noaslr)
for r in $(seq "${ROUNDS:-4}"); do
  for i in 0 1 2; do
    variant=${variants[$(( (i + r - 1) % 3 ))]}
    left=$(( ${CALL_S:-570} - SECONDS )); [ "$left" -gt 30 ] || { echo "out of time"; exit 0; }
    cmd=(python3 benchmarks/bench_methods.py --device cuda --model smollm2-135m --batch 8
      --seq 128 --steps 60 --warmup 3 --lora-r 8 --configs lora --out "$out/$variant-$r.json")
    case $variant in
      as-is) env=(env -u PYTHONHASHSEED) ;;
      hashseed) env=(env PYTHONHASHSEED=0) ;;
      hashseed-noaslr) env=(env PYTHONHASHSEED=0 "${noaslr[@]}") ;;
    esac
    timeout "$left" "${env[@]}" "${cmd[@]}" >/dev/null 2>>"$out/err.log" || { echo "| $r | $variant | stopped |"; continue; }
    python3 - "$out/$variant-$r.json" "$r" "$variant" <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))["results"][0]
if "step_times" not in r:  # the row's process failed: bench_methods kept its error
    sys.exit(print(f"| {sys.argv[2]} | {sys.argv[3]} | failed |"))
t = r["step_times"]
w = [statistics.median(t[i:i + 20]) for i in (0, 20, 40)]
print(f"| {sys.argv[2]} | {sys.argv[3]} | " + " | ".join(f"{x:.3f}" for x in w)
      + f" | {statistics.median(t):.3f} |")
PY
  done
done
