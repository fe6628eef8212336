#!/usr/bin/env bash
# torch's fused AdamW (training/step.py, `adamw`) against the multi-tensor default it
# replaces on CUDA: the code before (.old = `git archive <commit> src benchmarks`, carried)
# and now, alternately. One call after PART=tf, mw1, mw2 of gpu_models.sh:
#   bash benchmarks/gpu_fused_adamw.sh        # carry .old
# or, with SMALL_PAIRS=0, in a call of its own (carry .old and .whl: no model to stage):
#   SMALL_PAIRS=0 FULL_PAIRS=2 bash benchmarks/gpu_fused_adamw.sh
# 1. `slimtune train`, LoRA r8 on the default model (host-bound): step times, SMALL_PAIRS
#    pairs (2);
# 2. bench_methods.py, full fine-tuning of the 1.24B Llama shape at 4 x 2048 (the optimizer
#    updates 1.24B weights a step), old and new code alternately, FULL_PAIRS pairs (1),
#    the first side of each pair swapped from one pair to the next.
if [ "${SMALL_PAIRS:-2}" -gt 0 ]; then
  source benchmarks/gpu_models.sh
  old_and_new_train "${SMALL_PAIRS:-2}"
else
  set -euo pipefail
  out=${OUT:-/tmp/out}; mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name --format=csv,noheader
fi
PYTHONPATH=/tmp/site:$PWD/src python3 -c "import torch; from slimtune.training.step import adamw
print('fused on CUDA:', adamw([torch.nn.Parameter(torch.zeros(3, device='cuda'))], 1e-3).defaults['fused'])"
for i in $(seq "${FULL_PAIRS:-1}"); do
  order="old new"; [ $(( i % 2 )) = 0 ] && order="new old"
  for code in $order; do
    root=$PWD; [ $code = old ] && root=$PWD/.old
    left=$(( ${CALL_S:-590} - SECONDS )); [ "$left" -gt 0 ] || { echo "out of time"; exit 0; }
    echo "== 1.24B full, $code code, pair $i"
    PYTHONPATH=/tmp/site:$root/src timeout "$left" python3 \
      "$root/benchmarks/bench_methods.py" --device cuda --model llama-1.2b --batch 4 --seq 2048 \
      --steps 6 --warmup 2 --configs full 2>"$out/full-$code$i.log" | grep "^| full" \
      || { echo "stopped"; tail -3 "$out/full-$code$i.log"; }
  done
done
