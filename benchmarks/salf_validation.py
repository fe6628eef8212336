"""Does the SALF analysis rank end-of-freezing layers the way fine-tuning does?

Runs the analysis on the task's training data, then fine-tunes the same method, steps and
data at several freeze-below values (the recommended one always among them) and seeds,
and reports for each: measured quality (the task's score, eval loss; mean and spread over
seeds), step time, the predicted gain G(k); the Spearman rank correlation between G(k) and
the mean score; and how the recommended freeze-below does against training every layer.

Each run is one `slimtune train` process (lr_sweep.run_one) with the method's default rate
unless --lr says otherwise; --jobs runs them side by side (a 135M-270M model leaves a GPU
mostly idle), and then step times come from a timing pass: each freeze-below alone for
--timing-steps steps, without evaluation, --timing-rounds times in turn (median). The
quality runs' own step times are no measure when they share a device: the runs that start
last meet fewer peers (on a GPU they read freeze-below 12 of Gemma 3 at 0.39x of 0).

    python benchmarks/salf_validation.py --freeze-below 0,5,10,15,20,25,28 --steps 80
    python benchmarks/salf_validation.py --model gemma3-270m --task extract --seeds 0,1,2 \
        --freeze-below 0,3,6,9,12,15 --device cuda --jobs 12 --timing-steps 30
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lr_sweep import (  # benchmarks/, the script's folder
    TASKS,
    _rate,
    default_rate,
    run_one,
    time_cuts,
)
from rank_stats import spearman
from salf_rank_ceiling import ceiling


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--method", default="lora")
    ap.add_argument("--freeze-below", default="0,5,10,15,20,25,28")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", default="default", help="'default': the method's default rate")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--timing-steps",
        type=int,
        default=0,
        help="time each freeze-below alone for this many steps (0: the quality runs' "
        "step times, right only with --jobs 1)",
    )
    ap.add_argument(
        "--timing-rounds",
        type=int,
        default=3,
        help="times every freeze-below this many times, in turn, and keeps the median",
    )
    ap.add_argument("--out", default="runs/salf-validation")
    args = ap.parse_args()

    from slimtune.data import load_dataset
    from slimtune.model.loading import load_model
    from slimtune.salf.analysis import analyze

    data, _, metric = TASKS[args.task]
    base = load_model(args.model)
    analysis = analyze(base.model, load_dataset(data, base.tokenizer), progress=False)
    del base
    lr = default_rate(args.method, args.model) if args.lr == "default" else _rate(args.lr)
    asked = {int(x) for x in args.freeze_below.split(",")}
    if bad := sorted(k for k in asked if not 0 <= k < len(analysis.gain) - 1):
        ap.error(f"--freeze-below {bad}: {args.model} has {len(analysis.gain) - 1} layers")
    ks = sorted(asked | {0, analysis.freeze_below})  # 0: the run every cut is compared with
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(args.out)

    spec = {"model": args.model, "task": args.task, "method": args.method, "lr": lr}

    def job(k: int, seed: int) -> dict:
        run = {**spec, "seed": seed, "tag": f"freeze{k}"}
        row = run_one(run, out, args.device, args.steps, f"--freeze-below {k}")
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:  # a failed run is reported, not fatal
        done = list(pool.map(lambda a: job(*a), itertools.product(ks, seeds)))
    out.mkdir(parents=True, exist_ok=True)  # kept before the timing pass, which may be cut off
    (out / "quality_runs.json").write_text(json.dumps(done, indent=1))
    failed = [r for r in done if "error" in r]
    runs = [r for r in done if "error" not in r]
    timed: dict[int, float] = {}
    if args.timing_steps:
        # at the rate the quality run used (no second range test under --lr auto)
        used = {r["tag"]: f"{r['lr_used']:.3g}" for r in runs if r["seed"] == seeds[0]}
        times, failed_timing = time_cuts(
            {**spec, "seed": seeds[0]},
            out,
            args.device,
            args.timing_steps,
            ks,
            args.timing_rounds,
            rate=lambda k: used.get(f"freeze{k}", lr),
        )
        failed += failed_timing
        timed = {k: statistics.median(v) for k, v in times.items() if v}
    rows = []
    for k in ks:
        mine = [r for r in runs if r["tag"] == f"freeze{k}"]
        if not mine:
            continue
        scores = [r["score"] for r in mine]
        rows.append(
            {
                "freeze_below": k,
                "predicted_gain": analysis.gain[k],
                "scores": scores,
                "score": statistics.mean(scores),
                "score_sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "eval_loss": statistics.mean(r["eval_loss"] for r in mine),
                # one kind of measurement per table: a cut the timing pass missed gets none
                "step_time_s": timed.get(k)
                if args.timing_steps
                else statistics.median(r["step_time_p50_s"] for r in mine),
            }
        )
    for r in failed:
        print(f"failed: run {r['tag']}, seed {r['seed']}: {r['error']}", file=sys.stderr)
    have = {r["freeze_below"] for r in rows}
    if not {0, analysis.freeze_below} <= have:
        sys.exit("no run without freezing or at the recommended freeze-below finished")
    rho = spearman([r["predicted_gain"] for r in rows], [r["score"] for r in rows])
    rho_loss = spearman([r["predicted_gain"] for r in rows], [-r["eval_loss"] for r in rows])
    by_cut = [r["score"] for r in sorted(rows, key=lambda r: r["freeze_below"])]
    # the most any G that cannot rise with the cut reaches against these means
    rho_max = ceiling(by_cut)[0]
    full = next(r for r in rows if r["freeze_below"] == 0)
    rec = next(r for r in rows if r["freeze_below"] == analysis.freeze_below)
    name = metric.removeprefix("eval_")

    def vs_full(r: dict) -> str:
        have = r["step_time_s"] and full["step_time_s"]
        return f"{r['step_time_s'] / full['step_time_s']:.2f}x" if have else "-"

    print(
        f"{args.model}, {args.task}, {args.method} at lr {lr}, {args.steps} steps, seeds {args.seeds}"
    )
    print(f"analysis: {analysis.reason}\n")
    print(
        f"| freeze-below | predicted gain G(k) | {name}, per seed | mean ± sd | eval loss (mean) "
        "| step time vs 0 |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = " (recommended)" if r["freeze_below"] == analysis.freeze_below else ""
        print(
            f"| {r['freeze_below']}{mark} | {r['predicted_gain']:.3f} | "
            + " / ".join(f"{100 * x:.1f}" for x in r["scores"])
            + f" | {100 * r['score']:.1f} ± {100 * r['score_sd']:.1f} | {r['eval_loss']:.3f} | "
            f"{vs_full(r)} |"
        )
    print(
        f"\nSpearman(predicted gain, mean {name}) = {rho:.3f}; "
        f"Spearman(predicted gain, -eval loss) = {rho_loss:.3f}; the most any gain model "
        f"that cannot rise with the cut reaches against these means: {rho_max:.3f}"
    )
    print(
        f"recommended freeze-below {analysis.freeze_below}: {name} {100 * rec['score']:.1f} "
        f"against {100 * full['score']:.1f} with every layer "
        f"({100 * (rec['score'] - full['score']):+.1f} points), step time "
        f"{vs_full(rec)}"
    )
    (out / "salf_validation.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "task": args.task,
                "method": args.method,
                "lr": lr,
                "analysis": analysis.to_dict(),
                "rows": rows,
                "spearman_score": rho,
                "spearman_loss": rho_loss,
                "spearman_ceiling": rho_max,
                "failed": failed,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
