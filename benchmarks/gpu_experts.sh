#!/usr/bin/env bash
# One lent-GPU session for the expert-adapter rows of BENCHMARKS.md: check the grouped-GEMM
# path against the per-expert loop, then expert_latency.py on the 1.2B Llama-shaped model
# with the grouped GEMM and with the loop. Usage: bash benchmarks/gpu_experts.sh OUTDIR
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONPATH=src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$out/grouped_check.txt"
import torch, torch.nn.functional as F
from slimtune.methods import experts as X
print("torch", torch.__version__, "grouped_mm:", hasattr(F, "grouped_mm"))
torch.manual_seed(0)
lin = torch.nn.Linear(2048, 2048, bias=False).cuda().to(torch.bfloat16).requires_grad_(False)
router = X.ExpertRouter(2048, 8, 2).cuda()
ex = X.ExpertLinear(lin, router, 8, 16.0).cuda()
with torch.no_grad():
    ex.lora_B.normal_(0, 0.02)
x = torch.randn(4, 512, 2048, device="cuda", dtype=torch.bfloat16)
res = {}
for grouped in (True, False):
    X.GROUPED_MM = grouped
    for p in (ex.lora_A, ex.lora_B, router.weight):
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        router.current = router.route(x)
        y = ex(x)
    (y.float().pow(2).mean() + router.last_aux).backward()
    res[grouped] = (y.float(), ex.lora_A.grad.clone(), ex.lora_B.grad.clone(), router.weight.grad.clone())
    print("grouped" if grouped else "loop", "-> grouped GEMM used:", X._grouped_ok(x))
for name, a, b in zip(("output", "grad A", "grad B", "grad router"), res[True], res[False]):
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{name}: relative difference grouped vs loop {rel:.2e}")
PY
python3 benchmarks/expert_latency.py --device cuda --model llama-1.2b --rank 8,32 --batch 8 \
  --seq 2048 --reps 10 --out "$out/lat_gpu.json" > "$out/lat_gpu.md" 2> "$out/lat_gpu.err"
cat "$out/lat_gpu.md"; tail -3 "$out/lat_gpu.err"
python3 benchmarks/expert_latency.py --device cuda --model llama-1.2b --rank 8,32 --batch 8 \
  --seq 2048 --reps 10 --loop --out "$out/lat_gpu_loop.json" > "$out/lat_gpu_loop.md" \
  2> "$out/lat_gpu_loop.err"
cat "$out/lat_gpu_loop.md"; tail -3 "$out/lat_gpu_loop.err"
python3 benchmarks/bench_methods.py --device cuda --model llama-1.2b --batch 4 --seq 2048 \
  --steps 10 --warmup 3 --lora-r 16 --baseline lora \
  --configs lora,lora-bf16,experts,lora-freeze-half,experts-freeze-half \
  --out "$out/train_gpu.json" > "$out/train_gpu.md" 2> "$out/train_gpu.err"
tail -8 "$out/train_gpu.md"; tail -3 "$out/train_gpu.err"
