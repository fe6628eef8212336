"""``slimtune train`` in this process, with Python's garbage collections counted and timed
while it runs (issue 18: a small model's GPU step is host work, and a full collection inside
a step made it up to 3.6x the median). After the run, prints one JSON line: collections
per generation, their total and longest time, and the step times' median, 90th percentile,
longest and the count over 1.5x the median (from the run's metrics.jsonl).

    python benchmarks/train_gc.py -- --model default --data builtin:support_intents_train \\
        --method lora --device cuda --max-steps 42 --output-dir /tmp/r --no-store
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from plan_drift import GcClock


def main() -> None:
    args = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    import gc

    from slimtune.cli import main as cli_main

    clock = GcClock()
    gc.callbacks.append(clock)
    code = cli_main(["train", *args])
    if code:
        sys.exit(code)
    gc.callbacks.remove(clock)
    out = Path(args[args.index("--output-dir") + 1])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in lines if '"step_time_s"' in x]
    times = sorted(x["step_time_s"] for x in log[2:])
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "gc_collections": clock.count,
                "gc_s": round(clock.seconds, 3),
                "gc_longest_s": round(clock.longest, 3),
                "steps": len(times),
                "median_s": round(med, 4),
                "p90_s": round(times[int(0.9 * (len(times) - 1))], 4),
                "longest_s": round(times[-1], 4),
                "over_1.5x": sum(t > 1.5 * med for t in times),
                "mean_s": round(sum(times) / len(times), 4),
                "at": time.strftime("%H:%M:%S"),
            }
        )
    )


if __name__ == "__main__":
    main()
