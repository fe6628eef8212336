"""Where plan's step-time estimate and ``slimtune train``'s median step part (issue 18: on a
GPU the typical-step estimate fell 16-26% under the run's median step, on the CPU within 3%).

For each configuration, on the task's data, four numbers:

- ``est``: plan's estimate of the typical step (mini models, a linear fit in layers);
- ``whole min / median``: the same timed loop as the calibration (``salf.plan._measure``),
  on the whole model and the typical batch: min (what the calibration keeps) and median;
- ``whole, run's batches``: that loop over the run's own random batches (varying width);
- ``train``: ``slimtune train``'s median step (its own process, as plan_accuracy.py).

    python benchmarks/plan_gap.py --device cuda --configs lora-r8:0,full:7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from plan_accuracy import train_run


def timed_loop(model, method, opts, k, batches, device, autocast, steps, warmup):
    """``_measure``'s loop on the whole model, every step timed (not only the fastest)."""
    from slimtune.model.kernels import apply_fused_kernels
    from slimtune.salf.freezing import freeze_below
    from slimtune.salf.plan import _costing_method
    from slimtune.training.step import accumulate_gradients

    m = _costing_method(method, opts)
    apply_fused_kernels(model, device)
    model = m.prepare(model, list(range(k, len(_layers(model)))))
    freeze_below(model, k)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    model.train()
    times = []
    compute = m.compute_context(model) if device.type == "cuda" else _null()
    with compute:
        for i in range(steps + warmup):
            b = batches[i % len(batches)]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            accumulate_gradients(model, params, [b], device, autocast, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _layers(model):
    from slimtune.model.anatomy import decoder_layers

    return decoder_layers(model)


def _null():
    import contextlib

    return contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="builtin:support_intents_train")
    ap.add_argument("--configs", default="lora-r8:0,full:7")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    from slimtune.cli.salf import load_for_plan
    from slimtune.data import collate, load_dataset
    from slimtune.salf.plan import (
        calibrate,
        calibration_batch,
        estimate,
        sampled_batches,
        typical_batch,
    )

    device = torch.device(args.device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    print(
        "| config | freeze-below | est | whole min | whole median | whole, run's batches | train |"
    )
    print("|---|---|---|---|---|---|---|")
    for item in args.configs.split(","):
        name, _, k_text = item.partition(":")
        method, _, rank = name.partition("-r")
        opts = {"r": int(rank), "alpha": 2 * int(rank)} if rank else {}
        k = int(k_text)
        loaded = load_for_plan(args.model, args.device, ["none"], None)
        pad = loaded.tokenizer.pad_token_id
        ds = load_dataset(args.data, loaded.tokenizer, max_length=512)
        worst = calibration_batch(ds.examples, args.batch, pad)
        typical = typical_batch(ds.examples, args.batch, pad)
        costs = calibrate(
            loaded.model, method, opts, worst, autocast=autocast, typical_batch=typical
        )
        est = estimate(costs, k).step_time_s
        run_batches = [
            collate([ds.examples[i] for i in b], pad)
            for b in sampled_batches(len(ds.examples), args.batch, args.steps + args.warmup)
        ]
        w_min, w_med = timed_loop(
            loaded.model, method, opts, k, [typical], device, autocast, args.steps, args.warmup
        )
        del loaded
        loaded = load_for_plan(args.model, args.device, ["none"], None)
        _, r_med = timed_loop(
            loaded.model, method, opts, k, run_batches, device, autocast, args.steps, args.warmup
        )
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            t = train_run(args, args.data, method, opts, k, Path(tmp) / "run")["median"]
        print(
            f"| {name} | {k} | {est:.3f} | {w_min:.3f} | {w_med:.3f} | {r_med:.3f} | {t:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
