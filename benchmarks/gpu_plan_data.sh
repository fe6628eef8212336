#!/usr/bin/env bash
# plan's estimates on the bundled tasks' data against `slimtune train` on a lent GPU (issue
# 18: the typical step within 15% of the measured median step, CPU and GPU). Run after the
# staging calls in gpu_models.sh (the default model and transformers 5.24), then:
#   bash benchmarks/gpu_plan_data.sh           # (Liger comes with PART=mw2's .whl2)
#   DATA=builtin:support_extract_train bash benchmarks/gpu_plan_data.sh   # one task per call
# The CPU table in BENCHMARKS.md ("On the bundled tasks' data") is the same command with
# --device cpu.
source benchmarks/gpu_models.sh
timeout $(( ${CALL_S:-590} - SECONDS )) python3 benchmarks/plan_accuracy.py --device cuda \
  --batch 8 --steps ${STEPS:-30} --warmup 2 --repeats ${REPEATS:-1} \
  --data "${DATA:-builtin:support_intents_train,builtin:support_extract_train}" \
  --configs "${CONFIGS:-full:7,lora-r8:0,lora-r16:0,lora-r16:13}" 2>"$out/plan_data.log" \
  | tee "$out/plan_data.md"
