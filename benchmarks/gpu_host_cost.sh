#!/usr/bin/env bash
# The eager experts and sparse steps before and after a change of their host path, in one
# call: the code before it is exported to .old and carried beside the working tree, with
# .whl2 (liger-kernel):
#   mkdir .old && git archive 29b32fd src benchmarks | tar -x -C .old   # BENCHMARKS.md's run
#   PART=step bash benchmarks/gpu_host_cost.sh    # one GPU: experts, sparse, LoRA, the peer
#   PART=ddp  bash benchmarks/gpu_host_cost.sh    # 2 GPUs: sparse under DDP, old and new
# Rows alternate old/new so host drift falls on both. 1.24B Llama shape, 4 x 2048, bf16.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
export PYTHONPATH=/tmp/site PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
left() { echo $(( ${CALL_S:-580} - SECONDS - 10 )); }
shape=(--model llama-1.2b --batch 4 --seq 2048)
bench() {  # tree (. or .old), name, bench_methods args
  local tree=$1 name=$2; shift 2
  [ "$(left)" -gt 40 ] || { echo "$name: no time left"; return 0; }
  CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) < 240 ? $(left) : 240 )) \
    python3 "$tree/benchmarks/bench_methods.py" --device cuda "${shape[@]}" --steps 10 \
    --warmup 3 --lora-r 16 "$@" --out "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log" \
    || echo "$name stopped"
  echo "== $name"; grep '^| [a-z]' "$out/$name.md" | grep -v '^| config' || true
}
ddp() {  # tree, name, bench_distributed args
  local tree=$1 name=$2; shift 2
  [ "$(left)" -gt 60 ] || { echo "$name: no time left"; return 0; }
  timeout $(( $(left) < 240 ? $(left) : 240 )) python3 "$tree/benchmarks/bench_distributed.py" \
    "${shape[@]}" --steps 10 "$@" --out "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log" \
    || echo "$name stopped"
  echo "== $name"; grep '^| [a-z]' "$out/$name.md" | grep -v '^| config' || true
}
case "${PART:-step}" in
step)
  bench . peer --configs peft-lora-bf16-liger,lora
  for round in $(seq "${ROUNDS:-3}"); do
    bench .old "old-$round" --configs experts,sparse-columns
    bench . "new-$round" --configs experts,sparse-columns,lora
  done
  if [ -n "${PROFILE:-}" ]; then
    bench . profile --configs lora,experts --profile
    grep -E "profile of|wall per step|GPU kernel time" "$out/profile.log"
  fi
  ;;
profile)  # three profiled steps each: wall, GPU busy, syncs, the operators by host time
  bench . prof --configs lora,experts,sparse-columns --profile
  grep -E -A 18 "profile of|^-- by host" "$out/prof.log" | grep -vE "^-+$|Backend impl|attention: flash" \
    | cut -c1-60,100-135,170-200
  grep -E "profile of|wall per step|GPU kernel time" "$out/prof.log"
  ;;
ddp)
  for round in 1 2; do
    PYTHONPATH=.old/src:/tmp/site ddp .old "ddp-old-$round" --gpus 1,2 --configs sparse
    PYTHONPATH=src:/tmp/site ddp . "ddp-new-$round" --gpus 1,2 --configs sparse
  done
  ;;
esac
# PART=small: the same rows on the default model's shape (SmolLM2-135M, 8 x 128, LoRA r8),
# where a GPU step is mostly host work
if [ "${PART:-step}" = small ]; then
  shape=(--model smollm2-135m --batch 8 --seq 128)
  bench . small-peer --configs peft-lora-bf16,lora --lora-r 8
  for round in 1 2; do
    bench .old "small-old-$round" --configs experts,sparse-columns --lora-r 8
    bench . "small-new-$round" --configs experts,sparse-columns --lora-r 8
  done
  shape=(--model llama-1.2b --batch 4 --seq 2048)
  bench . profile --configs lora,experts --profile
  grep -E "profile of|Self CPU time total|Self CUDA time total" "$out/profile.log"
fi
