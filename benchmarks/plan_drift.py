"""Does plan's GPU step-time estimate depend on when in the process it is calibrated?

The GPU table of BENCHMARKS.md ("Timed on mixes as wide as the model") shows the same
pattern in three calls: full fine-tuning (calibrated first) costed under its measured step,
LoRA r16 (calibrated third) over, though r8 and r16 measure the same in ``slimtune train``.
This calibrates the configurations of ``--order`` one after another in one process, as
``plan`` and ``plan_accuracy.py`` do, so that a configuration calibrated twice shows any
drift with the process' age; and it records Python's garbage collections during each
calibration (their count and time, and the objects the collector tracks), since a
host-bound step pays for them.

    python benchmarks/plan_drift.py --device cuda --gc on \\
        --order lora-r16,lora-r8,full,lora-r16,lora-r8,full
    --gc off     : collector disabled during each calibration (collected between them)
    --gc freeze  : gc.freeze() after the model is loaded (what exists then is never scanned)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class GcClock:
    """Counts collections per generation and their wall time while active."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = 0.0
        self.longest = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            dt = time.perf_counter() - self._t0
            self.count[info["generation"]] += 1
            self.seconds += dt
            self.longest = max(self.longest, dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default="builtin:support_intents_train")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--order", default="lora-r16,lora-r8,full,lora-r16,lora-r8,full")
    ap.add_argument("--freeze-below", type=int, default=7, help="full's row (LoRA: 0)")
    ap.add_argument("--gc", choices=["on", "off", "freeze"], default="on")
    args = ap.parse_args()

    from plan_accuracy import config_options, data_batches, load_as_plan

    from slimtune.salf.plan import calibrate, estimate

    loaded, autocast = load_as_plan(args.model, args.device)
    worst, typical = data_batches(loaded, args.data, args.batch)
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()
    clock = GcClock()
    gc.callbacks.append(clock)
    print(f"gc {args.gc}; data {args.data}; batch {args.batch}")
    print(
        "| # | config | freeze-below | est. typical step (s) | calibration (s) | "
        "gc collections gen 0/1/2 | gc time (s) | longest (s) | tracked objects |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(args.order.split(",")):
        method, opts = config_options(name)
        k = args.freeze_below if method == "full" else 0
        gc.collect()
        clock.__init__()
        objects = len(gc.get_objects())
        if args.gc == "off":
            gc.disable()
        t0 = time.perf_counter()
        costs = calibrate(
            loaded.model, method, opts, worst, autocast=autocast, typical_batch=typical
        )
        took = time.perf_counter() - t0
        gc.enable()
        e = estimate(costs, k)
        row = {
            "i": i,
            "config": name,
            "k": k,
            "est": e.step_time_s,
            "took": took,
            "gc": clock.count,
            "gc_s": clock.seconds,
            "objects": objects,
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        print(
            f"| {i} | {name} | {k} | {e.step_time_s:.3f} | {took:.0f} | "
            f"{'/'.join(map(str, clock.count))} | {clock.seconds:.2f} | {clock.longest:.3f} | "
            f"{objects:,} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
