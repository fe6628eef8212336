#!/usr/bin/env bash
# QLoRA on the Llama-3-8B shape (issue 15) on a lent GPU, in one call (carry .whl: its wheels,
# liger-kernel and bitsandbytes among them, install under /tmp/site):
#   bash benchmarks/gpu_qlora.sh OUTDIR
# bench_methods on llama-8b (random weights; block linears NF4 + double quantization, built
# on the CPU and quantized onto the GPU by slimtune's quantize_model, one base for every
# row), 1 x 2048, LoRA r16, ratios against the peer peft-qlora-liger (the usual recipe:
# prepare_model_for_kbit_training with checkpointing, Liger), then 2 x 2048 for a few rows.
# Each row builds the 8B model in its own process (~20-40 s of the row's time), so:
#   CONFIGS="a,b,..."   the 1 x 2048 rows (first one: the baseline)
#   CONFIGS2="a,b,..."  the 2 x 2048 rows (CONFIGS2= skips them); skipped anyway once the
#                       call has run BATCH2_AFTER_S seconds (default 300), to stay under 8 min
# Writes bench_b1.{json,md,err}, bench_b2.{json,md,err} and summary.md (issue 15's bar) to OUTDIR.
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
python3 -c "import peft, transformers, liger_kernel, bitsandbytes, torch; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)"
# DEVICE, MODEL and SEQ override the shape (a dry run: DEVICE=cpu MODEL=llama-tiny SEQ=64)
common="--device ${DEVICE:-cuda} --model ${MODEL:-llama-8b} --seq ${SEQ:-2048} --lora-r 16"
common="$common --baseline peft-qlora-liger"
python3 benchmarks/bench_methods.py $common --batch 1 --steps 8 --warmup 2 \
  --configs ${CONFIGS:-peft-qlora-liger,peft-qlora-liger-nockpt,lora-nf4,lora-nf4-ckpt,sparse-nf4,experts-nf4} \
  --out "$out/bench_b1.json" > "$out/bench_b1.md" 2> "$out/bench_b1.err"
tail -10 "$out/bench_b1.md"; grep -i "error\|Traceback" "$out/bench_b1.err" | head -5
echo "elapsed ${SECONDS}s"
rows2=${CONFIGS2-peft-qlora-liger,lora-nf4,lora-nf4-ckpt}
if [ -n "$rows2" ] && [ "$SECONDS" -lt "${BATCH2_AFTER_S:-300}" ]; then
  python3 benchmarks/bench_methods.py $common --batch 2 --steps 5 --warmup 2 --configs "$rows2" \
    --out "$out/bench_b2.json" > "$out/bench_b2.md" 2> "$out/bench_b2.err"
  tail -6 "$out/bench_b2.md"; grep -i "error\|Traceback" "$out/bench_b2.err" | head -5
else
  echo "batch 2 skipped (rows: '$rows2', ${SECONDS}s elapsed)"
fi
# issue 15's bar per row: peak <= the peer's at the same batch, tokens/s >= 1.3x, and
# (slimtune, 1 x 2048) within 24 GiB (aim 16)
python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, sys
from pathlib import Path
print("| batch | config | tokens/s | peak GiB | build s | speed vs peer | memory vs peer | bar |")
print("|---|---|---|---|---|---|---|---|")
for b in (1, 2):
    f = Path(sys.argv[1]) / f"bench_b{b}.json"
    if not f.exists():
        continue
    rows = json.loads(f.read_text())["results"]
    peer = next((r for r in rows if r["config"] == "peft-qlora-liger" and "step_s" in r), None)
    for r in rows:
        if "step_s" not in r:
            print(f"| {b} | {r['config']} | failed | | | | | |")
            continue
        gib = r["peak_bytes"] / 2**30
        speed = mem = bar = "-"
        if peer:
            s, m = r["tokens_per_s"] / peer["tokens_per_s"], r["peak_bytes"] / peer["peak_bytes"]
            speed, mem = f"{s:.2f}x", f"{m:.2f}x"
            if r["impl"] == "slimtune":
                bar = "pass" if s >= 1.3 and m <= 1.0 and (b != 1 or gib <= 24) else "miss"
        print(f"| {b} | {r['config']} | {r['tokens_per_s']:,.0f} | {gib:.2f} | "
              f"{r['build_s']:.0f} | {speed} | {mem} | {bar} |")
PY
echo "total ${SECONDS}s"
