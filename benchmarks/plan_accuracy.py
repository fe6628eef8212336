"""How close are `slimtune plan`'s estimates to measurement?

For each method and several end-of-freezing layers: the estimate (calibrated on mini
copies of the architecture in this process) against a measured run of the same batch
shape (``bench_methods.py``, its own subprocess, median of timed steps, peak memory).

    python benchmarks/plan_accuracy.py --device cpu --model default --batch 4 --seq 256
    python benchmarks/plan_accuracy.py --device cuda --model llama-1.2b --batch 4 --seq 2048

A quantized base (issue 15: within 15% of measurement): ``--quantize nf4`` (or int8)
estimates and measures each method on a base whose block linears are stored that way (the
measured configs are bench_methods' ``METHOD-nf4``). By default the estimating process
holds the model quantized too, so its resident memory is measured; ``--plan-from-full``
holds it at full precision instead and converts the resident weights from parameter counts
(what plan does when the unquantized model fits):

    python benchmarks/plan_accuracy.py --device cuda --model llama-8b --batch 4 --seq 2048 \
        --methods lora --quantize nf4
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument(
        "--freeze-below", default="0,half,top2", help="k values; 'half' = L/2, 'top2' = L-2"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", help="JSON results")
    ap.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4", "int8"],
        help="the base's block linears, estimated and measured (bench config METHOD-QUANT)",
    )
    ap.add_argument(
        "--plan-from-full",
        action="store_true",
        help="estimate from the model held at full precision (resident weights converted "
        "from parameter counts) rather than from the model loaded quantized",
    )
    args = ap.parse_args()

    from bench_methods import CONFIGS, build_model, measure

    from slimtune.model.anatomy import decoder_layers
    from slimtune.salf.plan import calibrate, estimate, synthetic_batch

    device = torch.device(args.device)
    q = args.quantize
    model = build_model(args.model, args.device, "none" if args.plan_from_full else q)
    L = len(decoder_layers(model))
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(vocab, args.batch, args.seq)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    names = {"0": 0, "half": L // 2, "top2": L - 2}
    ks = [names[x] if x in names else int(x) for x in args.freeze_below.split(",")]
    rows = []
    for method in args.methods.split(","):
        config = method if q == "none" else f"{method}-{q}"  # bench_methods' config names
        if config not in CONFIGS:
            sys.exit(f"bench_methods has no config {config!r} to measure {method} on {q}")
        opts = (
            {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0}
            if method == "lora"
            else CONFIGS[config]["options"]  # what the measured run trains
        )
        costs = calibrate(model, method, opts, batch, autocast=autocast, quantize=q)
        for k in ks:
            e = estimate(costs, k)
            m, stderr = measure(config, args, freeze_below=k)
            if m is None:
                print(stderr[-2000:], file=sys.stderr)
                continue
            rows.append(
                {
                    "method": method,
                    "quantize": q,
                    "freeze_below": k,
                    "est_step_s": e.step_time_s,
                    "meas_step_s": m["step_s"],
                    "est_peak": e.peak_bytes,
                    "meas_peak": m["peak_bytes"],
                    "trainable_est": e.trainable_params,
                    "trainable_meas": m["trainable"],
                }
            )
            r = rows[-1]
            print(json.dumps(r), file=sys.stderr, flush=True)
    held = "full precision, resident converted" if args.plan_from_full else q
    print(
        f"\ndevice {args.device}; model {args.model}; batch {args.batch} x {args.seq}; "
        f"base {q} (estimated with the model held {held}); "
        f"measured: median of {args.steps} steps\n"
    )
    print(
        "| method | freeze-below | est. step (s) | measured (s) | error | est. peak (GiB) "
        "| measured (GiB) | error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        et = r["est_step_s"] / r["meas_step_s"] - 1
        em = r["est_peak"] / r["meas_peak"] - 1
        worst = max(worst, abs(et), abs(em))
        print(
            f"| {r['method']} | {r['freeze_below']} | {r['est_step_s']:.3f} | "
            f"{r['meas_step_s']:.3f} | {100 * et:+.0f}% | {r['est_peak'] / 2**30:.2f} | "
            f"{r['meas_peak'] / 2**30:.2f} | {100 * em:+.0f}% |"
        )
    print(f"\nworst error: {100 * worst:.0f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
