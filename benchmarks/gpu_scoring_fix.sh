#!/usr/bin/env bash
# Issue 18, after the mask guard (src/slimtune/model/masks.py): does the GPU now score as
# the CPU does, and what do Gemma 3's default rates reach there when scored right?
# 1. eval_parity.py on the base alone (fp32 and bf16): batch 1 (no padding) against
#    batch 16 as slimtune now scores, as it did (unfixed), with the guard alone under the
#    memory-efficient kernel, and under torch's math kernel;
# 2. beside it, lr_sweep.py at every method's default rate on TASKS, seeds 0-2, one
#    process per run (the same runs as the GPU sweeps in BENCHMARKS.md);
# 3. then eval_parity.py on the sweep's sparse seed-0 delta, guarded and unfixed.
#   after PART=tf and PART=gw1..gw4 of gpu_models.sh, carry .whl2:
#   TASKS=intents,extract JOBS=30 BUDGET_S=400 bash benchmarks/gpu_scoring_fix.sh
export GEMMA_ONLY=1
source benchmarks/gpu_models.sh
tasks=${TASKS:-intents}
methods=${METHODS:-lora,sparse,rosa,shira,experts}
mkdir -p /tmp/fix
(
  python3 benchmarks/eval_parity.py --delta none --device cuda \
    --cases sdpa:1,sdpa:16,unfixed:16,efficient:16,math:16,eager:16
  python3 benchmarks/eval_parity.py --delta none --device cuda --dtype bf16 \
    --cases sdpa:1,sdpa:16,unfixed:16
) > "$out/parity-base.jsonl" 2> /tmp/fix/parity.err &
timeout "${BUDGET_S:-400}" python3 benchmarks/lr_sweep.py --device cuda --models gemma3-270m \
  --tasks "$tasks" --methods "$methods" --lrs default --seeds 0,1,2 --jobs "${JOBS:-15}" \
  --out /tmp/fix/sweep > /tmp/fix/sweep.log 2>&1 || echo "sweep stopped" >> /tmp/fix/sweep.log
cp /tmp/fix/sweep/results.jsonl "$out/sweep.jsonl" || true
wait
d=$(ls -d /tmp/fix/sweep/runs/*intents-sparse*-0/delta 2>/dev/null | head -1)
if [ -n "$d" ]; then
  python3 benchmarks/eval_parity.py --delta "$d" --device cuda \
    --cases sdpa:16,unfixed:16,efficient:16,sdpa:1 \
    > "$out/parity-sparse.jsonl" 2>> /tmp/fix/parity.err
fi
tail -n 3 /tmp/fix/sweep.log /tmp/fix/parity.err || true
for f in "$out"/parity-*.jsonl; do
  echo "== $(basename "$f")"
  python3 -c "import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print(r['case'], r.get('dtype'), r.get('accuracy'), r.get('gold_loss'), r.get('error', ''), 'wrong:', len(r.get('wrong', [])), r.get('s'))" "$f"
done
[ -f "$out/sweep.jsonl" ] && python3 benchmarks/lr_sweep.py --table "$out/sweep.jsonl"
