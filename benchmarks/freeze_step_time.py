"""Step time of `slimtune train` at several freeze-below values, alone (no evaluation, no
quality run beside it): rounds over every cut in turn, the median per cut, and its ratio
against training every layer.

    python benchmarks/freeze_step_time.py --model gemma3-270m --task intents \\
        --freeze-below 0,6,9,12 --steps 12 --rounds 2 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import TASKS, default_rate, time_cuts  # benchmarks/, the script's folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--method", default="lora")
    ap.add_argument("--freeze-below", default="0,6,9,12")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    ks = [int(k) for k in args.freeze_below.split(",")]
    if 0 not in ks:
        ks.insert(0, 0)
    job = {"model": args.model, "task": args.task, "method": args.method}
    job |= {"lr": default_rate(args.method, args.model), "seed": 0}
    with tempfile.TemporaryDirectory() as out:
        times, failed = time_cuts(job, Path(out), args.device, args.steps, ks, args.rounds)
    if failed:
        sys.exit("\n".join(f"{r['tag']}: {r['error']}" for r in failed))
    base = statistics.median(times[0])
    print(f"{args.model}, {args.task}, {args.method}, {args.steps} steps x {args.rounds} rounds")
    for k in ks:
        t = statistics.median(times[k])
        runs = ", ".join(f"{v:.3f}" for v in times[k])
        print(f"  freeze-below {k}: {t:.3f} s ({runs}), {t / base:.2f}x every layer's")


if __name__ == "__main__":
    main()
