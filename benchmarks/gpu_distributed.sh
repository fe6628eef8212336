#!/usr/bin/env bash
# Several GPUs (issue 16) on a lent multi-GPU host, one part per call (carry .whl: its
# wheels, liger-kernel among them, install under /tmp/site; WHEELS=.whl2 takes another
# folder, e.g. one without bitsandbytes, which these parts do not use):
#   PART=smoke bash benchmarks/gpu_distributed.sh OUTDIR   # slimtune train under torchrun:
#                                    # DDP lora and FSDP2 full, a tiny model, 2 GPUs
#   PART=ddp   bash benchmarks/gpu_distributed.sh OUTDIR   # 1.24B shape, 4 x 2048 per GPU:
#                                    # lora, sparse 1%, peft + Liger + DDP on 1, 2, 4 GPUs
#   PART=contention bash benchmarks/gpu_distributed.sh OUTDIR  # 2 GPUs: is DDP's longer step
#                                    # the host's? (one-GPU runs alone and two at once)
#   PART=fsdp  bash benchmarks/gpu_distributed.sh OUTDIR   # Llama-3-8B shape, 1 x 2048 per
#                                    # GPU, checkpointing: full and lora under FSDP2
# GPUS overrides the GPU counts (default 1,2,4); CONFIGS the rows; STEPS the timed steps (ddp);
# PROFILE=1 prints a profile of rank 0 on the most GPUs, TRACE=1 with it writes chrome traces
# of rank 0 on every GPU count to OUTDIR/traces.
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# NVLink multicast off on the shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${WHEELS:-.whl}"/*.whl 2>/dev/null
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/versions.txt"
python3 -c "import peft, transformers, accelerate, liger_kernel, torch; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/versions.txt"
gpus=${GPUS:-1,2,4}
case "${PART:-ddp}" in
smoke)
  python3 -c "from slimtune.testing import tiny_model_dir; tiny_model_dir('/tmp/tiny')"
  common="--model /tmp/tiny --data builtin:support_intents_train --max-steps 30 --batch-size 4"
  common="$common --no-progress --no-store --save-every 10 --keep-checkpoint"
  # RUNS="lora --compile;sparse --compile" checks train --compile under DDP instead
  IFS=';' read -ra runs <<< "${RUNS:-lora;full --fsdp}"
  for run in "${runs[@]}"; do
    name=${run// /}; name=${name//-/}
    python3 -m torch.distributed.run --nproc_per_node 2 -m slimtune train --method $run \
      $common --output-dir "/tmp/smoke-$name" > "$out/smoke-$name.txt" 2>&1
    echo "$run: rc $?"; tail -16 "$out/smoke-$name.txt"
    cp "/tmp/smoke-$name/summary.json" "$out/smoke-$name-summary.json" 2>/dev/null
  done
  ;;
ddp)
  python3 benchmarks/bench_distributed.py --model llama-1.2b --batch 4 --seq 2048 \
    --gpus "$gpus" --configs "${CONFIGS:-lora,peft-lora-liger,sparse}" --steps "${STEPS:-6}" --out "$out/ddp.json" ${PROFILE:+--profile} ${TRACE:+--trace "$out/traces"} \
    > "$out/ddp.md" 2> "$out/ddp.err"
  cat "$out/ddp.md"; grep -i "error\|Traceback" "$out/ddp.err" | head -8
  ;;
contention)
  # is a longer step on 2 GPUs DDP's, or the host's? the config alone on one GPU, then two
  # independent one-GPU runs at once (no DDP, one per GPU), then DDP on 2; NUMA=node repeats
  # them with torchrun --numa-binding node
  args="--model llama-1.2b --batch 4 --seq 2048 --steps ${STEPS:-10} --configs ${CONFIGS:-sparse}"
  python3 benchmarks/bench_distributed.py $args --gpus 1 --out "$out/alone.json" 2> "$out/alone.err" | tail -1
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_distributed.py $args --gpus 1 --port 29700 \
    --out "$out/pair0.json" > "$out/pair0.md" 2> "$out/pair0.err" &
  CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_distributed.py $args --gpus 1 --port 29800 \
    --out "$out/pair1.json" > "$out/pair1.md" 2> "$out/pair1.err"
  wait
  echo "two at once:"; tail -1 "$out/pair0.md"; tail -1 "$out/pair1.md"
  python3 benchmarks/bench_distributed.py $args --gpus 2 --out "$out/ddp2.json" 2> "$out/ddp2.err" | tail -1
  if [ -n "${NUMA:-}" ]; then
    echo "torchrun --numa-binding $NUMA:"
    python3 benchmarks/bench_distributed.py $args --gpus 1,2 --numa-binding "$NUMA" \
      --out "$out/numa.json" 2> "$out/numa.err" | tail -2
  fi
  nproc; lscpu | grep -i "numa\|socket\|model name"; nvidia-smi topo -m | head -5
  ;;
fsdp)
  python3 benchmarks/bench_distributed.py --model llama-8b --batch 1 --seq 2048 --steps 4 \
    --gpus "$gpus" --configs "${CONFIGS:-full-fsdp,lora-fsdp}" --checkpointing \
    --out "$out/fsdp.json" > "$out/fsdp.md" 2> "$out/fsdp.err"
  cat "$out/fsdp.md"; grep -i "error\|Traceback" "$out/fsdp.err" | head -8
  ;;
esac
echo "elapsed ${SECONDS}s"
