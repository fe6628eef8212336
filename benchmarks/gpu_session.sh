#!/usr/bin/env bash
# One lent-GPU session for BENCHMARKS.md: the trainer end to end on CUDA (tiny model), the
# method table (bench_methods) and plan's estimates against measurement (plan_accuracy), on
# the 1.2B Llama-shaped model. Usage: bash benchmarks/gpu_session.sh OUTDIR
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
nvidia-smi --query-gpu=name --format=csv,noheader
python3 - <<'PY' 2>&1 | tail -3
import tempfile, json
from pathlib import Path
from slimtune.testing import tiny_model_dir
from slimtune import TrainConfig, train
d = Path(tempfile.mkdtemp())
m = tiny_model_dir(d / "m")
rows = [{"prompt": f"Message: parcel {i}\nIntent:", "completion": " shipping" if i % 2 else " billing"} for i in range(64)]
(d / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
r = train(TrainConfig(model=str(m), data=str(d / "x.jsonl"), output_dir=str(d / "run"), max_steps=20, batch_size=8, lr=1e-2, progress=False, device="cuda", eval_fraction=0.25))
print("cuda trainer ok:", {k: r.summary[k] for k in ("device", "final_train_loss", "eval_accuracy", "peak_memory_kind")})
PY
python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --steps 10 --warmup 3 --lora-r 16 --baseline peft-lora \
  --configs peft-lora,peft-lora-bf16,peft-lora-bf16-liger,peft-lora-bf16-liger-top-half,hf-full,full,full-freeze-half,lora,lora-bf16,lora-freeze-half,lora-bf16-freeze-half,lora-bf16-liger-kernels,lora-bf16-liger-kernels-freeze-half \
  --out "$out/bench_gpu.json" > "$out/bench_gpu.md" 2> "$out/bench_gpu.err"
tail -17 "$out/bench_gpu.md"
python3 benchmarks/plan_accuracy.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --methods full,lora --freeze-below 0,8,14 --steps 10 --warmup 3 \
  --out "$out/plan_gpu.json" > "$out/plan_gpu.md" 2> "$out/plan_gpu.err"
cat "$out/plan_gpu.md"
