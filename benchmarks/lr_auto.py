"""How good is ``--lr auto``? Its range test on every method, task and model of the
learning-rate sweep, scored with the sweep's own measurements.

For each (model, task, method) the range test runs as ``slimtune train --lr auto`` runs it
(the trainer is built, which runs the test; no training follows). Its record goes to
``OUT/searches.jsonl``. ``--table`` then reads the sweep's results (``benchmarks/lr_sweep.py``)
and, for a divisor (the rule is: chosen = rate at the probe's best loss / divisor), gives
each choice's measured score: the sweep's mean score at the swept rate nearest the choice
(in log scale), against the best swept rate and the fixed default.

    python benchmarks/lr_auto.py --device cpu --models default --out runs/lr_auto
    python benchmarks/lr_auto.py --table runs/lr_auto --sweep runs/lr_sweep/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lr_sweep import METHODS, TASKS, default_rate


def search_one(model: str, task: str, method: str, device: str, seed: int) -> dict:
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import Trainer

    data, eval_data, _ = TASKS[task]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=model,
            data=data,
            eval_data=eval_data,
            method=method,
            lr="auto",
            seed=seed,
            device=device,
            output_dir=out,
            progress=False,
            save_every=0,
        )
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.close()
        assert trainer.lr_search is not None
        return {
            "model": model,
            "task": task,
            "method": method,
            "seed": seed,
            "setup_s": round(time.perf_counter() - t0, 1),
            **trainer.lr_search.to_dict(),
        }


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "searches.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["task"], r["method"], r["seed"]))
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            for method in args.methods.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    if (model, task, method, seed) in done:
                        continue
                    row = search_one(model, task, method, args.device, seed)
                    with path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(
                        f"{model} {task} {method} seed {seed}: chosen {row['chosen']:.3g} "
                        f"({row['steps']} steps, {row['seconds']:.0f}s)",
                        flush=True,
                    )


def _sweep_means(path: Path) -> dict:
    """{(model, task, method): {lr: mean score %}} from the sweep's results."""
    scores: dict = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        r = json.loads(line)
        # the swept rates only: not --lr auto's own runs, nor runs with other flags (--tag)
        if r.get("score") is not None and r["lr"] != "auto" and not r.get("tag"):
            scores[(r["model"], r["task"], r["method"])][float(r["lr"])].append(100 * r["score"])
    return {k: {lr: statistics.mean(v) for lr, v in d.items()} for k, d in scores.items()}


def nearest(lr: float, swept) -> float:
    return min(swept, key=lambda s: abs(math.log(s / lr)))


def table(args) -> None:
    from slimtune.methods import METHODS as CLASSES

    means = _sweep_means(Path(args.sweep))
    rows = [json.loads(x) for x in (Path(args.table) / "searches.jsonl").read_text().splitlines()]
    divisors = [float(d) for d in args.divisors.split(",")]
    print(
        "| model | task | method | lr at best probe | "
        + " | ".join(f"/{d:g}: lr, score" for d in divisors)
        + " | best swept (score) | default (score) |"
    )
    print("|---|---|---|---|" + "---|" * len(divisors) + "---|---|")
    misses = defaultdict(int)
    for r in rows:
        key = (r["model"], r["task"], r["method"])
        if key not in means:
            continue
        sweep = means[key]
        best_lr = max(sweep, key=sweep.get)
        spelt = default_rate(r["method"], r["model"])  # scaled where train scales it
        default = CLASSES[r["method"]].default_lr if spelt == "auto" else float(spelt)
        at_best = r["chosen"] * r["settings"]["divisor"]
        cells = []
        for d in divisors:
            lr = at_best / d
            s = sweep[nearest(lr, sweep)]
            if s < sweep[best_lr] - 1.0:
                misses[d] += 1
            cells.append(f"{lr:.2g}, {s:.1f}")
        dflt = sweep.get(default)
        print(
            f"| {r['model']} | {r['task']} | {r['method']} | {at_best:.2g} | "
            + " | ".join(cells)
            + f" | {best_lr:g} ({sweep[best_lr]:.1f}) | {default:g} "
            f"({'-' if dflt is None else f'{dflt:.1f}'}) |"
        )
    print()
    for d in divisors:
        print(f"divisor {d:g}: {misses[d]} of {len(rows)} more than 1 point under the best")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lr_auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default="default,gemma3-270m")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--table", help="a folder with searches.jsonl: print the table")
    p.add_argument("--sweep", default="runs/lr_sweep/results.jsonl")
    p.add_argument("--divisors", default="1,2,3,5,10")
    args = p.parse_args()
    table(args) if args.table else run(args)


if __name__ == "__main__":
    main()
