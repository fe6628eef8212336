#!/usr/bin/env bash
# One lent-GPU session for the foundation benchmarks (run from the repository root):
#   bash benchmarks/gpu_foundation.sh OUTDIR
# Optional wheels (e.g. liger-kernel, for the PEFT + Liger peer) are taken from .whl/.
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

# 1. the trainer end to end on CUDA (bf16 autocast path), tiny model
python3 - <<'PY' 2>&1 | tail -5
import tempfile, json
from pathlib import Path
from slimtune.testing import tiny_model_dir
from slimtune.trainer import TrainConfig, train
d = Path(tempfile.mkdtemp())
m = tiny_model_dir(d / "m")
rows = [{"prompt": f"Message: parcel {i}\nIntent:", "completion": " shipping" if i % 2 else " billing"} for i in range(64)]
(d / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
r = train(TrainConfig(model=str(m), data=str(d / "x.jsonl"), output_dir=str(d / "run"), max_steps=20, batch_size=8, lr=1e-2, progress=False, device="cuda", eval_fraction=0.25))
print("cuda trainer ok:", {k: r.summary[k] for k in ("device", "final_train_loss", "eval_accuracy", "peak_memory_kind")})
PY

# 2. the 1.2B Llama-shaped benchmark, every configuration in one run
python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --steps 10 --warmup 3 --lora-r 16 --baseline peft-lora \
  --configs peft-lora,peft-lora-bf16,peft-lora-bf16-liger,peft-lora-bf16-liger-top-half,hf-full,full,full-freeze-half,lora,lora-bf16,lora-freeze-half,lora-bf16-freeze-half,lora-bf16-liger-kernels,lora-bf16-liger-kernels-freeze-half \
  --out "$out/bench_gpu.json" | tee "$out/bench_gpu.md"
