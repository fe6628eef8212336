# Issue 18: does the GPU score the same delta lower than the CPU, and which part of the
# scoring does it? Two Gemma 3 deltas trained on the GPU (sparse 2e-4 seed 0, LoRA 1e-3
# seed 1, 100 steps x 8, default options), each scored by benchmarks/eval_parity.py on the
# GPU in fp32 and bf16 (every case) and on the same machine's CPU (fp32, SDPA, batch 16).
#   PART=tf bash benchmarks/gpu_models.sh; PART=gw1 ... gw4   (see gpu_models.sh)
#   bash benchmarks/gpu_eval_parity.sh                         # carry .whl2
set -euo pipefail
export GEMMA_ONLY=1
source benchmarks/gpu_models.sh
out=${OUT:-/tmp/out}
train() {  # method lr seed
  python3 -m slimtune train --model gemma3-270m --data builtin:support_intents_train \
    --eval-data builtin:support_intents_test --method "$1" --lr "$2" --seed "$3" \
    --device cuda --output-dir "/tmp/eval_parity/$1" --overwrite --no-progress \
    --save-every 0 > "$out/train-$1.log" 2>&1
  grep -E "eval_accuracy|accuracy" "$out/train-$1.log" | tail -2 || true
}
train sparse 2e-4 0 & train lora 1e-3 1 & wait
for m in sparse lora; do
  d=/tmp/eval_parity/$m/delta
  OMP_NUM_THREADS=6 python3 benchmarks/eval_parity.py --delta "$d" --device cpu \
    --cases sdpa:16 > "$out/$m-cpu.jsonl" 2> "$out/$m-cpu.err" &
done
for m in sparse lora; do
  d=/tmp/eval_parity/$m/delta
  python3 benchmarks/eval_parity.py --delta "$d" --device cuda > "$out/$m-cuda-fp32.jsonl" 2> "$out/$m-cuda.err"
  python3 benchmarks/eval_parity.py --delta "$d" --device cuda --dtype bf16 \
    --cases sdpa:16,sdpa:1,full:16 > "$out/$m-cuda-bf16.jsonl" 2>> "$out/$m-cuda.err"
done
wait
for f in "$out"/*.jsonl; do
  echo "== $(basename "$f")"
  python3 -c "import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print(r.get('case'), r.get('dtype'), r.get('accuracy'), r.get('gold_loss'), r.get('error', ''), 'wrong:', len(r.get('wrong', [])), r.get('s'))" "$f"
done
