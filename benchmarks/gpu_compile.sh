#!/usr/bin/env bash
# train --compile on a lent GPU (issue 14), one part per call (carry .whl: liger-kernel,
# installed under /tmp/site):
#   PART=train bash benchmarks/gpu_compile.sh OUTDIR  # slimtune train with and without
#       --compile on a tiny model and the bundled intents (batches of varying length):
#       the same losses, the step time, and the compile's cost (first step)
#   PART=8b    bash benchmarks/gpu_compile.sh OUTDIR  # Llama-3-8B shape, 2 x 2048, LoRA r16:
#       peft + Liger, slimtune lora, lora --compile (bench_methods rows)
# The 1.24B rows are `CONFIGS=...,lora+compile,... bash benchmarks/gpu_fast_path.sh speed`;
# a 4-bit base's are `CONFIGS=...,lora-nf4+compile bash benchmarks/gpu_qlora.sh`.
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
case "${PART:-train}" in
train)
  python3 -c "from slimtune.testing import tiny_model_dir; tiny_model_dir('/tmp/tiny')"
  for method in ${METHODS:-lora experts sparse}; do
    for flag in "" "--compile"; do
      name=$method${flag:+-compile}
      python3 -m slimtune train --model /tmp/tiny --data builtin:support_intents_train \
        --max-steps ${STEPS:-60} --batch-size 8 --no-progress --no-store --save-every 0 \
        --device cuda --method $method $flag --output-dir /tmp/c/$name > "$out/$name.log" 2>&1 \
        || { echo "$name failed"; tail -5 "$out/$name.log"; continue; }
      python3 - "$name" <<'PY' | tee -a "$out/train.jsonl"
import json, sys
name = sys.argv[1]
s = json.load(open(f"/tmp/c/{name}/summary.json"))
log = [json.loads(x) for x in open(f"/tmp/c/{name}/metrics.jsonl") if '"loss"' in x]
print(json.dumps({"run": name, "first_step_s": log[0]["step_time_s"],
                  "step_p50_s": s["step_time_p50_s"], "train_time_s": s["train_time_s"],
                  "losses_1_5_last": [log[0]["loss"], log[4]["loss"], log[-1]["loss"]],
                  "eval_loss": s["eval_loss"], "kernels": s.get("fused_kernels")}))
PY
    done
  done
  grep -h "recompile_limit\|Graph break" "$out"/*.log | sort | uniq -c | head -5
  ;;
8b)
  python3 benchmarks/bench_methods.py --device cuda --model llama-8b --batch 2 --seq 2048 \
    --steps 5 --warmup 3 --lora-r 16 --baseline peft-lora-bf16-liger \
    --configs ${CONFIGS:-peft-lora-bf16-liger,lora,lora+compile} \
    --out "$out/bench_8b.json" > "$out/bench_8b.md" 2> "$out/bench_8b.err"
  tail -6 "$out/bench_8b.md"; grep -i "error\|Traceback" "$out/bench_8b.err" | head -5
  ;;
esac
echo "elapsed ${SECONDS}s"
