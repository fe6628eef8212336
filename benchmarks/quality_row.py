"""One JSON line of a `slimtune train` run's summary for the quality tables of the GPU
scripts (gpu_fast_path.sh quality, gpu_fast_quality.sh):

    python benchmarks/quality_row.py RUN_DIR VARIANT SEED FLAGS >> quality.jsonl
"""

import json
import sys
from pathlib import Path

KEYS = ("eval_accuracy", "eval_loss", "lr", "tokens_per_s", "step_time_p50_s")
KEYS += ("peak_memory_bytes", "fused_kernels")

run, variant, seed, flags = sys.argv[1:5]
summary = json.loads((Path(run) / "summary.json").read_text())
row = {"variant": variant, "seed": int(seed), "flags": flags}
print(json.dumps(row | {k: summary.get(k) for k in KEYS}))
