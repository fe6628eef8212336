#!/usr/bin/env bash
# One lent-GPU session: the method table (bench_methods) and plan's estimates against
# measurement (plan_accuracy), on the 1.2B Llama-shaped model. Usage: bash benchmarks/gpu_salf.sh OUTDIR
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --steps 10 --warmup 3 --lora-r 16 --baseline peft-lora \
  --configs peft-lora,peft-lora-bf16,peft-lora-bf16-liger,peft-lora-bf16-liger-top-half,hf-full,full,full-freeze-half,lora,lora-bf16,lora-freeze-half,lora-bf16-freeze-half,lora-bf16-liger-kernels,lora-bf16-liger-kernels-freeze-half \
  --out "$out/bench_gpu.json" > "$out/bench_gpu.md" 2> "$out/bench_gpu.err"
tail -17 "$out/bench_gpu.md"
python3 benchmarks/plan_accuracy.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --methods full,lora --eofs 0,8,14 --steps 10 --warmup 3 \
  --out "$out/plan_gpu.json" > "$out/plan_gpu.md" 2> "$out/plan_gpu.err"
cat "$out/plan_gpu.md"
