"""Quality and cost of the methods on the bundled task, same steps, data and seed.

Each configuration is one `slimtune train` process (the real command; its own process, so
peak RSS is its own), evaluated on the 240 test messages of support-intents.

    python benchmarks/method_quality.py --steps 80 --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# label: (method, lr, options)
CONFIGS = {
    "full": ("full", 5e-5, {}),
    "lora r=8": ("lora", 5e-4, {"r": 8}),
    "sparse 1% fisher": ("sparse", 2e-4, {"density": 0.01, "importance": "fisher"}),
    "sparse 1% grad": ("sparse", 2e-4, {"density": 0.01, "importance": "grad"}),
    "sparse 1% activation": ("sparse", 2e-4, {"density": 0.01, "importance": "activation"}),
    "sparse 1% random": ("sparse", 2e-4, {"density": 0.01, "importance": "random"}),
    "rosa r=8 + 0.5%": ("rosa", 5e-4, {"r": 8, "density": 0.005}),
    "shira 1% (peft)": ("shira", 2e-4, {"density": 0.01}),
    # the sparse delta moves individual weights: a larger step size than LoRA's may suit it
    "sparse 1% fisher lr=1e-3": ("sparse", 1e-3, {"density": 0.01, "importance": "fisher"}),
    "sparse 1% grad lr=1e-3": ("sparse", 1e-3, {"density": 0.01, "importance": "grad"}),
    "sparse 1% activation lr=1e-3": ("sparse", 1e-3, {"density": 0.01, "importance": "activation"}),
    "sparse 1% random lr=1e-3": ("sparse", 1e-3, {"density": 0.01, "importance": "random"}),
    "lora r=8 lr=1e-3": ("lora", 1e-3, {"r": 8}),
    "full lr=1e-4": ("full", 1e-4, {}),
    "rosa r=8 + 0.5% lr=1e-3": ("rosa", 1e-3, {"r": 8, "density": 0.005}),
    "shira 1% (peft) lr=1e-3": ("shira", 1e-3, {"density": 0.01}),
    # routed experts against LoRA of the same active parameters per token (k * r = 16)
    "lora r=16": ("lora", 5e-4, {"r": 16, "alpha": 32}),
    "lora r=16 lr=1e-3": ("lora", 1e-3, {"r": 16, "alpha": 32}),
    "experts 8 x r=8 top-2": ("experts", 5e-4, {"experts": 8, "top_k": 2, "rank": 8}),
    "experts 8 x r=8 top-2 lr=1e-3": ("experts", 1e-3, {"experts": 8, "top_k": 2, "rank": 8}),
    "experts 8 x r=8 top-2 aux=0.1": (
        "experts",
        5e-4,
        {"experts": 8, "top_k": 2, "rank": 8, "aux_weight": 0.1},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated labels")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--freeze-below", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/quality")
    args = ap.parse_args()
    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for label in args.configs.split(","):
        method, lr, options = CONFIGS[label]
        out = Path(args.out) / label.replace(" ", "_").replace("%", "pct").replace("=", "")
        cmd = [
            sys.executable,
            "-m",
            "slimtune",
            "train",
            "--data",
            "builtin:support_intents_train",
            "--eval-data",
            "builtin:support_intents_test",
            "--method",
            method,
            "--lr",
            str(lr),
            "--max-steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--freeze-below",
            str(args.freeze_below),
            "--seed",
            str(args.seed),
            "--output-dir",
            str(out),
            "--overwrite",
            "--no-progress",
            "--save-every",
            "0",
        ]
        for k, v in options.items():
            cmd += ["-o", f"{k}={v}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        s = json.loads((out / "summary.json").read_text())
        rows.append(
            {
                "config": label,
                "lr": lr,
                **{
                    k: s.get(k)
                    for k in (
                        "eval_accuracy",
                        "eval_loss",
                        "step_time_p50_s",
                        "peak_memory_bytes",
                        "trainable_params",
                        "delta_bytes",
                        "train_time_s",
                    )
                },
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\n{args.steps} steps of batch {args.batch_size}, seed {args.seed}, freeze-below "
        f"{args.freeze_below}; accuracy and loss on the 240 support-intents test messages\n"
    )
    print(
        "| config | lr | accuracy | eval loss | step time (s) | peak RSS (GiB) | trainable params "
        "| delta on disk (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['lr']:g} | {100 * r['eval_accuracy']:.1f}% | "
            f"{r['eval_loss']:.3f} | {r['step_time_p50_s']:.2f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['trainable_params']:,} | "
            f"{r['delta_bytes'] / 2**20:.2f} |"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
