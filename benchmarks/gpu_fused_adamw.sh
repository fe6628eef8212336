#!/usr/bin/env bash
# torch's fused AdamW (training/step.py, `adamw`) against the multi-tensor default it
# replaces on CUDA: the code before (.old = `git archive <commit> src benchmarks`, carried)
# and now, alternately. One call after PART=tf, mw1, mw2 of gpu_models.sh:
#   bash benchmarks/gpu_fused_adamw.sh        # carry .old
# 1. `slimtune train`, LoRA r8 on the default model (host-bound): step times, 2 pairs;
# 2. bench_methods.py, full fine-tuning of the 1.24B Llama shape at 4 x 2048 (the optimizer
#    updates 1.24B weights a step), before and after.
source benchmarks/gpu_models.sh
python3 -c "import torch; from slimtune.training.step import adamw
print('fused on CUDA:', adamw([torch.nn.Parameter(torch.zeros(3, device='cuda'))], 1e-3).defaults['fused'])"
old_and_new_train 2
for code in old new; do
  root=$PWD; [ $code = old ] && root=$PWD/.old
  echo "== 1.24B full, $code code"
  PYTHONPATH=/tmp/site:$root/src timeout $(( ${CALL_S:-590} - SECONDS )) python3 \
    "$root/benchmarks/bench_methods.py" --device cuda --model llama-1.2b --batch 4 --seq 2048 \
    --steps 6 --warmup 2 --configs full 2>"$out/full-$code.log" | grep "^| full" \
    || { echo "stopped"; tail -3 "$out/full-$code.log"; }
done
