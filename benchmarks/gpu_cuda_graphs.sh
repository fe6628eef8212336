#!/usr/bin/env bash
# CUDA graphs over the compiled decoder layers (inductor's "reduce-overhead"), issue 14: where
# the host bounds a step (the default model's shape, experts), the graph replays a layer's
# kernels without their Python and launches. One part per call (carry .whl2: liger-kernel):
#   PART=train bash benchmarks/gpu_cuda_graphs.sh  # slimtune train on a tiny model and the
#       bundled intents (batches of varying width): eager, --compile, --compile graphs;
#       losses, step times, the first step
#   PART=small bash benchmarks/gpu_cuda_graphs.sh  # bench_methods, SmolLM2-135M shape, 8 x 128
#   PART=big   bash benchmarks/gpu_cuda_graphs.sh  # bench_methods, 1.24B shape, 4 x 2048
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
left() { echo $(( ${CALL_S:-585} - SECONDS - 10 )); }
bench() {  # name, bench_methods args
  local name=$1; shift
  [ "$(left)" -gt 40 ] || { echo "$name: no time left"; return 0; }
  timeout $(( $(left) )) python3 benchmarks/bench_methods.py --device cuda "$@" \
    --out "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log" || echo "$name stopped"
  echo "== $name"; grep '^| ' "$out/$name.md" || tail -5 "$out/$name.log"
}
driver='
import functools, os, sys
import slimtune.training.trainer as t
from slimtune.cli import main
if os.environ.get("GRAPHS"):
    t.compiled_layers = functools.partial(t.compiled_layers, cuda_graphs=True)
sys.exit(main(sys.argv[1:]))
'
case "${PART:-train}" in
train)
  python3 -c "from slimtune.testing import tiny_model_dir; tiny_model_dir('/tmp/tiny')"
  for method in ${METHODS:-lora experts}; do
    for mode in eager compile graphs; do
      [ "$(left)" -gt 40 ] || { echo "$method $mode: no time left"; continue; }
      flags=(); [ $mode = eager ] || flags=(--compile)
      name=$method-$mode
      # graphs: train --compile with the trainer's compiled_layers switched to CUDA graphs
      # (not a flag of train: BENCHMARKS.md, "CUDA graphs over the compiled layers")
      GRAPHS=$([ $mode = graphs ] && echo 1) timeout $(( $(left) )) python3 -c "$driver" train \
        --model /tmp/tiny \
        --data builtin:support_intents_train --max-steps ${STEPS:-60} --batch-size 8 \
        --no-progress --no-store --save-every 0 --device cuda --method $method "${flags[@]}" \
        --output-dir /tmp/c/$name > "$out/$name.log" 2>&1 \
        || { echo "$name failed"; tail -8 "$out/$name.log"; continue; }
      python3 - "$name" <<'PY'
import json, sys
name = sys.argv[1]
s = json.load(open(f"/tmp/c/{name}/summary.json"))
log = [json.loads(x) for x in open(f"/tmp/c/{name}/metrics.jsonl") if '"loss"' in x]
times = sorted(x["step_time_s"] for x in log[10:])
print(json.dumps({"run": name, "first_step_s": round(log[0]["step_time_s"], 1),
                  "step_p50_s": s["step_time_p50_s"], "p50_after_10": times[len(times) // 2],
                  "train_time_s": round(s["train_time_s"], 1),
                  "losses_1_5_last": [log[0]["loss"], log[4]["loss"], log[-1]["loss"]],
                  "eval_loss": s["eval_loss"]}))
PY
    done
  done
  grep -h "recompile_limit\|skipping cudagraphs\|Graph break" "$out"/*.log | sort | uniq -c | head -8
  ;;
small)
  bench small --model smollm2-135m --batch 8 --seq 128 --steps 20 --warmup 4 --lora-r 8 \
    --configs "${CONFIGS:-lora,lora+compile,lora+graphs,full,full+compile,full+graphs,experts,experts+compile,experts+graphs}"
  grep -h "skipping cudagraphs" "$out"/*.log | sort | uniq -c | head -5
  ;;
big)
  bench big --model llama-1.2b --batch 4 --seq 2048 --steps 10 --warmup 4 --lora-r 16 \
    --baseline peft-lora-bf16-liger \
    --configs "${CONFIGS:-peft-lora-bf16-liger,lora,lora+compile,lora+graphs,experts,experts+compile,experts+graphs}"
  grep -h "skipping cudagraphs" "$out"/*.log | sort | uniq -c | head -5
  ;;
esac
echo "elapsed ${SECONDS}s"
