"""Does a 16-bit base cost a method that writes into it? Train on the CPU with the base
loaded in bf16, as a GPU loads it, where ``slimtune train --device cpu`` keeps fp32.

Sparse writes base + values into the base's own dtype, so in bf16 a small trained value is
rounded to the grid of the entry it sits on; at a lower rate the values are smaller and
the rounding relatively larger. Compare the printed score with the same run in fp32
(``benchmarks/lr_sweep.py --device cpu``) and on the GPU (the sweep there).

    python benchmarks/bf16_base_probe.py --model gemma3-270m --method sparse --lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import TASKS  # benchmarks/, the script's folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="intents", choices=sorted(TASKS))
    ap.add_argument("--method", default="sparse")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bf16_base_probe")
    args = ap.parse_args()

    from slimtune.model.loading import load_model
    from slimtune.training.config import TrainConfig
    from slimtune.training.trainer import train

    data, eval_data, metric = TASKS[args.task]
    loaded = load_model(args.model, device="cpu", dtype="bf16")
    name = f"{args.model}-{args.task}-{args.method}-{args.lr:g}-{args.seed}"
    cfg = TrainConfig(
        model=args.model,
        data=data,
        eval_data=eval_data,
        method=args.method,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        precision="bf16",
        output_dir=str(Path(args.out) / name),
        overwrite=True,
        progress=False,
        save_every=0,
    )
    s = train(cfg, loaded).summary
    print(
        json.dumps(
            {**vars(args), "score": s.get(metric), "step_time_p50_s": s.get("step_time_p50_s")}
        )
    )


if __name__ == "__main__":
    main()
