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

On real data (issue 18: the typical step against a run's median step): ``--data`` costs
each configuration as ``slimtune plan`` does (the worst case: the longest examples; the
typical batch: a random batch of the median padded width) and measures it with ``slimtune
train`` itself in its own process (random batches of seed 0, median of the steps after
``--warmup``, peak memory of the run):

    python benchmarks/plan_accuracy.py --device cpu --batch 8 --steps 16 --warmup 2 \
        --data builtin:support_intents_train --configs full:7,lora-r8:0,lora-r16:0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
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
        "--repeats",
        type=int,
        default=1,
        help="with --data: run each configuration's slimtune train this many times (each "
        "its own process) and compare the estimate with the mean of their medians",
    )
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
    ap.add_argument(
        "--data",
        help="real data, comma-separated (e.g. builtin:support_intents_train): estimate as "
        "plan does and measure with slimtune train (--configs, --steps, --warmup)",
    )
    ap.add_argument(
        "--configs",
        default="full:7,lora-r8:0,lora-r16:0",
        help="with --data: METHOD[-rN]:FREEZE_BELOW, comma-separated",
    )
    args = ap.parse_args()
    if args.data:
        on_data(args)
        return

    from bench_methods import CONFIGS, build_model, measure

    from slimtune.model.anatomy import decoder_layers
    from slimtune.salf.plan import calibrate, estimate, synthetic_batch

    device = torch.device(args.device)
    q = args.quantize
    model = build_model(args.model, args.device, "none" if args.plan_from_full else q)
    L = len(decoder_layers(model))
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(vocab, args.batch, args.seq)
    autocast = step_autocast(device)
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


class OtherWork:
    """Cores that other processes than this one and its children kept busy meanwhile
    (Linux's /proc/stat): on a shared machine, work of others slows the calibration and
    the measured run unequally, so each row says how much there was."""

    def _busy(self) -> float:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def _own(self) -> float:
        me, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> OtherWork:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        others = (self._busy() - self.busy0) - (self._own() - self.own0)
        self.cores = max(others, 0.0) / max(time.perf_counter() - self.t0, 1e-9)


def train_run(args, data: str, method: str, options: dict, k: int, out: Path) -> dict:
    """``slimtune train`` of one configuration in its own process: the median step after
    the warm-up, and the run's peak memory."""
    import statistics
    import subprocess

    cmd = [sys.executable, "-m", "slimtune", "train", "--data", data, "--method", method]
    cmd += ["--model", args.model, "--device", args.device, "--batch-size", str(args.batch)]
    cmd += ["--max-steps", str(args.steps + args.warmup), "--freeze-below", str(k)]
    cmd += ["--eval-fraction", "0", "--save-every", "0", "--no-progress", "--overwrite"]
    cmd += ["--output-dir", str(out)]
    if "r" in options:
        cmd += ["--lora-r", str(options["r"]), "--lora-alpha", str(options["alpha"])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in steps if "step_time_s" in r][args.warmup :]
    summary = json.loads((out / "summary.json").read_text())
    return {"median": statistics.median(times), "peak": summary["peak_memory_bytes"]}


def _spread(medians: list[float]) -> str:
    """`` (lowest-highest)`` of several runs' medians; nothing for one run."""
    return f" ({min(medians):.3f}-{max(medians):.3f})" if len(medians) > 1 else ""


def step_autocast(device: torch.device):
    """The autocast plan's calibration runs its steps under, as `train` does there."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def load_as_plan(model: str, device: str):
    """The model as ``slimtune plan`` loads it, and its steps' autocast."""
    from slimtune.cli.salf import load_for_plan

    return load_for_plan(model, device, ["none"], None), step_autocast(torch.device(device))


def config_options(name: str) -> tuple[str, dict]:
    """``lora-r16`` -> (``lora``, r 16 at alpha 32); a name without ``-rN``: no options."""
    method, _, rank = name.partition("-r")
    return method, ({"r": int(rank), "alpha": 2 * int(rank)} if rank else {})


def data_batches(loaded, data: str, batch: int) -> tuple[dict, dict | None]:
    """The batches plan calibrates ``data`` on: its longest examples', and its typical
    width's (None when the widths agree: plan times one batch then)."""
    from slimtune.data import load_dataset
    from slimtune.salf.plan import calibration_batch, typical_batch

    pad = loaded.tokenizer.pad_token_id
    ds = load_dataset(data, loaded.tokenizer, max_length=512)
    worst = calibration_batch(ds.examples, batch, pad)
    typical = typical_batch(ds.examples, batch, pad)
    return worst, None if typical["input_ids"].shape == worst["input_ids"].shape else typical


def on_data(args) -> None:
    """Estimates as ``slimtune plan`` makes them against ``slimtune train`` on real data."""
    import platform
    import tempfile

    from slimtune.salf.plan import calibrate, estimate

    loaded, autocast = load_as_plan(args.model, args.device)
    configs = []
    for item in args.configs.split(","):
        name, _, k = item.partition(":")
        configs.append((name, *config_options(name), int(k)))
    rows = []
    for data in args.data.split(","):
        worst, typical = data_batches(loaded, data, args.batch)
        costs, others = {}, {}
        for name, method, opts, k in configs:
            if name not in costs:
                with OtherWork() as calibrating:
                    costs[name] = calibrate(
                        loaded.model,
                        method,
                        opts,
                        worst,
                        autocast=autocast,
                        typical_batch=typical,
                    )
                others[name] = calibrating.cores
            e = estimate(costs[name], k)
            medians, peaks = [], []
            with tempfile.TemporaryDirectory() as tmp, OtherWork() as running:
                for i in range(args.repeats):
                    m = train_run(args, data, method, opts, k, Path(tmp) / f"run{i}")
                    medians.append(m["median"])
                    peaks.append(m["peak"])
            rows.append(
                {
                    "data": data.removeprefix("builtin:"),
                    "config": name,
                    "freeze_below": k,
                    "typical_width": int(
                        (worst if typical is None else typical)["input_ids"].shape[1]
                    ),
                    "worst_width": int(worst["input_ids"].shape[1]),
                    "est_typical_s": e.step_time_s,
                    "est_worst_s": e.worst_step_time_s,
                    "meas_median_s": sum(medians) / len(medians),
                    "meas_medians_s": medians,
                    "timing_scale": costs[name].timing_scale,
                    "est_peak": e.peak_bytes,
                    "meas_peak": max(peaks),  # the highest of the runs
                    "other_cores_calibrating": others[name],
                    "other_cores_running": running.cores,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\ndevice {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads); model {args.model}; batch {args.batch}; "
        f"measured: slimtune train, median of {args.steps} steps after {args.warmup}"
        f"{f', the mean of {args.repeats} runs (spread: their range; peak: their highest)' if args.repeats > 1 else ''}\n"
    )
    print(
        "| data | config | freeze-below | batch width typical / longest | est. typical step (s) "
        "| est. longest step (s) | measured median step (s) | typical error | longest error "
        "| est. peak (GiB) | measured peak (GiB) | error | other work (cores): calibration / run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        et = r["est_typical_s"] / r["meas_median_s"] - 1
        ew = r["est_worst_s"] / r["meas_median_s"] - 1
        em = r["est_peak"] / r["meas_peak"] - 1
        print(
            f"| {r['data']} | {r['config']} | {r['freeze_below']} | {r['typical_width']} / "
            f"{r['worst_width']} | {r['est_typical_s']:.3f} | {r['est_worst_s']:.3f} | "
            f"{r['meas_median_s']:.3f}{_spread(r['meas_medians_s'])} | {100 * et:+.0f}% | {100 * ew:+.0f}% | "
            f"{r['est_peak'] / 2**30:.2f} | {r['meas_peak'] / 2**30:.2f} | {100 * em:+.0f}% | "
            f"{r['other_cores_calibrating']:.2f} / {r['other_cores_running']:.2f} |"
        )
    worst_t = max(abs(r["est_typical_s"] / r["meas_median_s"] - 1) for r in rows)
    print(f"\nworst typical-step error: {100 * worst_t:.0f}%")
    scales = {f"{r['data']} {r['config']}": r["timing_scale"] for r in rows}
    print(f"step times fitted on mixes of s x (2..5) layers, s: {scales}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
