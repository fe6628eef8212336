"""Does the SALF analysis rank end-of-freezing layers the way fine-tuning does?

Runs the analysis on the training data, then fine-tunes the same method, steps, data and
seed with several freeze-below values, and reports for each: measured quality
(accuracy, eval loss), step time, the predicted gain G(k); the Spearman rank
correlation between G(k) and the measured accuracy; and how the recommended freeze-below does
against training every layer.

    python benchmarks/salf_validation.py --freeze-below 0,5,10,15,20,25,28 --steps 80
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            r[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="builtin:support_intents_train")
    ap.add_argument("--eval-data", default="builtin:support_intents_test")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--freeze-below", default="0,5,10,15,20,25,28")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/salf-validation")
    ap.add_argument(
        "--merge",
        help="rows of an earlier run (its salf_validation.json) to "
        "report with these; ks already there are not rerun",
    )
    args = ap.parse_args()

    from slimtune.data import load_dataset
    from slimtune.model.loading import load_model
    from slimtune.salf.analysis import analyze
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    base = load_model("default")
    analysis = analyze(base.model, load_dataset(args.data, base.tokenizer), progress=False)
    rows = json.loads(Path(args.merge).read_text())["rows"] if args.merge else []
    done = {r["freeze_below"] for r in rows}
    ks = sorted(({int(x) for x in args.freeze_below.split(",")} | {analysis.freeze_below}) - done)
    for k in ks:
        res = train(
            TrainConfig(
                data=args.data,
                eval_data=args.eval_data,
                method=args.method,
                freeze_below=k,
                max_steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                output_dir=f"{args.out}/freeze{k}",
                overwrite=True,
                progress=False,
                save_every=0,
                seed=args.seed,
            )
        )
        s = res.summary
        rows.append(
            {
                "freeze_below": k,
                "predicted_gain": analysis.gain[k],
                "accuracy": s["eval_accuracy"],
                "eval_loss": s["eval_loss"],
                "step_time_s": s["step_time_p50_s"],
                "trainable": s["trainable_params"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for r in rows:  # the gain of merged rows follows the current analysis
        r["predicted_gain"] = analysis.gain[r["freeze_below"]]
    rows.sort(key=lambda r: r["freeze_below"])
    rho = spearman([r["predicted_gain"] for r in rows], [r["accuracy"] for r in rows])
    rho_loss = spearman([r["predicted_gain"] for r in rows], [-r["eval_loss"] for r in rows])
    full = next(r for r in rows if r["freeze_below"] == 0)
    rec = next(r for r in rows if r["freeze_below"] == analysis.freeze_below)
    print(f"analysis: {analysis.reason}\n")
    print(
        "| freeze-below | predicted gain G(k) | accuracy | eval loss | step time (s) "
        "| step time vs 0 | trainable params |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (recommended)" if r["freeze_below"] == analysis.freeze_below else ""
        print(
            f"| {r['freeze_below']}{mark} | {r['predicted_gain']:.3f} | {100 * r['accuracy']:.1f}% | "
            f"{r['eval_loss']:.3f} | {r['step_time_s']:.3f} | "
            f"{r['step_time_s'] / full['step_time_s']:.2f}x | {r['trainable']:,} |"
        )
    print(
        f"\nSpearman(predicted gain, accuracy) = {rho:.3f}; "
        f"Spearman(predicted gain, -eval loss) = {rho_loss:.3f}"
    )
    print(
        f"recommended freeze-below {analysis.freeze_below}: accuracy {100 * rec['accuracy']:.1f}% against "
        f"{100 * full['accuracy']:.1f}% with every layer "
        f"({100 * (rec['accuracy'] - full['accuracy']):+.1f} points), step time "
        f"{100 * (1 - rec['step_time_s'] / full['step_time_s']):.0f}% shorter"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "salf_validation.json").write_text(
        json.dumps(
            {
                "analysis": analysis.to_dict(),
                "rows": rows,
                "spearman_accuracy": rho,
                "spearman_loss": rho_loss,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
