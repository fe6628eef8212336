"""`train --cache-frozen` on a bundled task: what it buys over a whole run, and that it
trains what the uncached run trains.

`slimtune train` runs (``--runs``), one process each, the same data, seed and rate, for
``--epochs`` passes over the training split: every layer trained; ``--freeze-below K
--no-cache-frozen`` (the cache is on by default for runs over their data twice);
``--freeze-below K --cache-frozen``; and ``--freeze auto --cache-frozen``. For each: the
task's score and eval loss, the median step of the first epoch (the cache fills) and of
the later ones (it serves), the mean step over the run, and each against the all-layer
run's.

    python benchmarks/frozen_cache_train.py --task intents --freeze-below 10 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import TASKS, default_rate, run_one  # benchmarks/, the script's folder

RUNS = {
    "all layers": "",
    "frozen": "--freeze-below {k} --no-cache-frozen",  # the cache is on by default
    "cached": "--freeze-below {k} --cache-frozen",
    "auto cached": "--freeze auto --cache-frozen",  # the analysis' cut (--freeze-below unused)
}


def _train_examples(task: str) -> int:
    from slimtune.data import resolve_path

    return sum(1 for line in resolve_path(TASKS[task][0]).open() if line.strip())


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--method", default="lora")
    ap.add_argument("--freeze-below", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", default=None, help="default: the method's default rate")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="more `slimtune train` flags for every run")
    ap.add_argument("--runs", default=",".join(RUNS), help="which of: " + ", ".join(RUNS))
    ap.add_argument("--out", default="runs/frozen_cache_train")
    args = ap.parse_args()

    per_epoch = math.ceil(_train_examples(args.task) / args.batch)
    steps = args.epochs * per_epoch
    out = Path(args.out)
    job = {"model": args.model, "task": args.task, "method": args.method}
    job |= {"lr": args.lr or default_rate(args.method, args.model), "seed": args.seed}
    rows = {}
    for name in args.runs.split(","):
        flags = RUNS[name].format(k=args.freeze_below) + f" --batch-size {args.batch} {args.extra}"
        spec = {**job, "tag": name.replace(" ", "_")}
        row = run_one(spec, out, args.device, steps, flags)
        if "error" in row:
            raise SystemExit(f"{name}: {row['error']}")
        folder = out / "runs" / "-".join(str(v) for v in spec.values())
        log = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in log if "step_time_s" in r]
        summary = json.loads((folder / "summary.json").read_text())
        rows[name] = {
            **row,
            "first_epoch_s": statistics.median(times[:per_epoch]),
            "later_epochs_s": statistics.median(times[per_epoch:]) if args.epochs > 1 else None,
            "mean_step_s": statistics.fmean(times),
            "train_time_s": summary["train_time_s"],
            "frozen_cache": summary.get("frozen_cache"),
            "freeze_below": summary.get("freeze_below"),
        }
        print(json.dumps(rows[name]), file=sys.stderr, flush=True)
    (out / f"results-seed{args.seed}.json").write_text(json.dumps(rows, indent=1))

    base = rows.get("all layers")
    print(
        f"\n{args.model}, {args.task}, {args.method} at {job['lr']}, batch {args.batch}, "
        f"{args.epochs} epochs ({steps} steps), freeze-below {args.freeze_below}, seed "
        f"{args.seed}, {args.device} {args.extra}\n"
    )
    print("| run | score | eval loss | epoch 1 step (s) | later epochs' step (s) | mean step (s) "
          "| mean vs all layers | later vs all layers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [f"{100 * r['score']:.1f}", f"{r['eval_loss']:.3f}", f"{r['first_epoch_s']:.3f}"]
        cells += [_s(r["later_epochs_s"]), f"{r['mean_step_s']:.3f}"]
        cells += [_ratio(r, base, "mean_step_s"), _ratio(r, base, "later_epochs_s")]
        label = f"{name} (freeze-below {r['freeze_below']})" if name == "auto cached" else name
        print(f"| {label} | " + " | ".join(cells) + " |")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def _ratio(row: dict, base: dict | None, key: str) -> str:
    return f"{row[key] / base[key]:.2f}x" if base and row[key] and base[key] else "-"


if __name__ == "__main__":
    main()
