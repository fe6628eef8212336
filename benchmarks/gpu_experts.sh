#!/usr/bin/env bash
# One lent-GPU session for the expert-adapter rows of BENCHMARKS.md: check the fused Triton
# kernel and the grouped GEMM against an fp32 reference, then expert_latency.py on the 1.2B
# Llama-shaped model with the fused kernel (expert ranks RANKS, ROUNDS rounds) and the other
# paths in PATHS (default: gathered; also: sets, loop; rank 8, 3 rounds); TRAIN=1 adds the
# training-step table (experts by expert set and by single expert).
# Usage: bash benchmarks/gpu_experts.sh OUTDIR [RANKS=8,32] [ROUNDS=3]
set -u
out=${1:-${OUT:-/tmp/out}}
ranks=${2:-8,32}
rounds=${3:-3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/expert_kernel_check.py 2>&1 | tee "$out/kernel_check.txt"
for path in auto ${PATHS:-gathered}; do
  if [ $path = auto ]; then r=$ranks; n=$rounds; else r=8; n=3; fi
  [ "$ranks" = none ] && [ $path = auto ] && continue
  python3 benchmarks/expert_latency.py --device cuda --model llama-1.2b --rank "$r" \
    --batch 8 --seq 2048 --reps 10 --rounds "$n" --decode-tokens 64 --path $path \
    --out "$out/lat_gpu_$path.json" > "$out/lat_gpu_$path.md" 2> "$out/lat_gpu_$path.err"
  cat "$out/lat_gpu_$path.md"; tail -3 "$out/lat_gpu_$path.err"
done
if [ "${TRAIN:-0}" = 1 ]; then
  python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
    --steps 10 --warmup 3 --lora-r 16 --baseline lora \
    --configs lora,lora-bf16,experts,experts-by-expert,lora-freeze-half,experts-freeze-half \
    --out "$out/train_gpu.json" > "$out/train_gpu.md" 2> "$out/train_gpu.err"
  tail -8 "$out/train_gpu.md"; tail -3 "$out/train_gpu.err"
fi
