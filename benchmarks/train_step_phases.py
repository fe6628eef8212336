"""Where ``slimtune train``'s step time goes beyond the forward, backward and optimizer step
that plan's calibration times (plan_gap.py found train's median step 8-25% above that loop's
on a GPU). Builds the run's Trainer and times each phase of its loop, the device waited for
after each, over the same steps as the run:

    python benchmarks/train_step_phases.py --device cuda --method full --freeze-below 7
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections import defaultdict

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="builtin:support_intents_train")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--freeze-below", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--lr", default=None, help="as train's --lr (default: the method's)")
    args = ap.parse_args()

    from slimtune.training.config import TrainConfig
    from slimtune.training.step import accumulate_gradients
    from slimtune.training.trainer import Trainer

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            model=args.model,
            data=args.data,
            method=args.method,
            freeze_below=args.freeze_below,
            batch_size=args.batch,
            max_steps=args.steps,
            device=args.device,
            output_dir=tmp,
            eval_fraction=0.0,
            save_every=0,
            progress=False,
            **({} if args.lr is None else {"lr": args.lr if args.lr == "auto" else float(args.lr)}),
        )
        t = Trainer(cfg)
        phases: dict[str, list[float]] = defaultdict(list)
        acc = t.accelerator
        t.model.train()  # as Trainer._run: loading leaves it in eval mode (no dropout)
        with t._compute_context():
            for step in range(args.steps):
                sync()
                marks = [("start", time.perf_counter())]
                batches, _, targets = t._step_batches(step)
                marks.append(("batches", time.perf_counter()))
                accumulate_gradients(
                    t.parallel, t.params, batches, t.device, acc.autocast,
                    cfg.max_grad_norm, targets=targets,
                )  # fmt: skip
                sync()
                marks.append(("forward+backward", time.perf_counter()))
                t.optimizer.step()
                sync()
                marks.append(("optimizer", time.perf_counter()))
                t.method.on_step_end(t.model, t.optimizer, step)
                t.scheduler.step()
                t.optimizer.zero_grad(set_to_none=True)
                sync()
                marks.append(("rest", time.perf_counter()))
                if step >= 2:
                    for (_, a), (name, b) in itertools.pairwise(marks):
                        phases[name].append(b - a)
                    phases["step"].append(marks[-1][1] - marks[0][1])
                    phases["width"].append(float(batches[0]["input_ids"].shape[1]))
        t.close()
    print(f"{args.method} freeze-below {args.freeze_below} lr {t.lr:.2g} on {args.device}, median over "
          f"{args.steps - 2} steps (ms):")  # fmt: skip
    for name, v in phases.items():
        scale = 1 if name == "width" else 1000
        print(f"  {name:18s} {scale * statistics.median(v):8.2f}   (min {scale * min(v):.2f})")


if __name__ == "__main__":
    main()
