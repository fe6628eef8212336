"""Learning-rate sweep of every method on both bundled tasks and both packaged models.

Each run is one `slimtune train` process with the default options but `--lr` (`default`
stands for the method's current default, recorded as its number), scored on the task's test
split: accuracy for support-intents, exact match for support-extract. Runs go `--jobs` at a
time (a 135M-270M model leaves a GPU mostly idle), results are appended to
`OUT/results.jsonl` as they finish, and a rerun skips what is there, so a sweep longer than
one sitting resumes.

    python benchmarks/lr_sweep.py --device cuda --jobs 8 --out runs/lr_sweep
    python benchmarks/lr_sweep.py --table runs/lr_sweep/results.jsonl   # tables only
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from slimtune.methods import METHODS as METHOD_CLASSES

TASKS = {
    "intents": ("builtin:support_intents_train", "builtin:support_intents_test", "eval_accuracy"),
    "extract": (
        "builtin:support_extract_train",
        "builtin:support_extract_test",
        "eval_exact_match",
    ),
}
METHODS = ["lora", "sparse", "rosa", "shira", "experts", "full"]
LRS = "1e-4,3e-4,1e-3,3e-3"
FULL_LRS = "1e-5,3e-5,1e-4,3e-4"


def run_one(
    job: dict, out: Path, device: str, steps: int | None, flags: str = "", evaluate: bool = True
) -> dict:
    """One ``slimtune train`` process; ``evaluate=False`` (a timing run) skips the test
    split, whose generation would outlast a short run's steps."""
    data, eval_data, metric = TASKS[job["task"]]
    name = "-".join(str(v) for v in job.values() if v != "")
    folder = out / "runs" / name.strip("/").replace("/", "_")  # a model given as a path
    cmd = [sys.executable, "-m", "slimtune", "train", "--model", job["model"], "--data", data]
    cmd += ["--eval-data", eval_data] if evaluate else ["--eval-fraction", "0"]
    cmd += ["--method", job["method"], "--seed", str(job["seed"])]
    cmd += ["--device", device, "--output-dir", str(folder), "--overwrite", "--no-progress"]
    cmd += ["--save-every", "0"]
    cmd += ["--lr", job["lr"]]
    if steps:
        cmd += ["--max-steps", str(steps)]
    cmd += flags.split()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    row = {**job, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-1:]}
    s = json.loads((folder / "summary.json").read_text())
    search = json.loads((folder / "delta" / "manifest.json").read_text()).get("lr_search")
    if search:  # --lr auto: the range test's curve, for choosing its rule afresh
        row["lr_search"] = {k: search[k] for k in ("lrs", "losses", "start_loss", "chosen")}
    return {**row, "score": s.get(metric), "eval_loss": s.get("eval_loss"),
            "step_time_p50_s": s.get("step_time_p50_s"), "lr_used": s.get("lr")}  # fmt: skip


def time_cuts(
    job: dict, out: Path, device: str, steps: int, ks: list[int], rounds: int, rate=None
) -> tuple[dict[int, list[float]], list[dict]]:
    """Step time of ``job`` (model, task, method, lr, seed) at each freeze-below in ``ks``,
    each cut alone and without evaluation, in ``rounds`` over every cut in turn (a slow
    spell of the host hits all): each cut's step times, round by round, and the runs
    that failed. ``rate(k)``:
    the learning rate of cut ``k`` (default: the job's). Each run's row goes to stderr."""
    times: dict[int, list[float]] = {k: [] for k in ks}
    failed = []
    for rnd in range(rounds):
        for k in ks:
            spec = {**job, "lr": rate(k) if rate else job["lr"], "tag": f"time{rnd}-{k}"}
            row = run_one(spec, out, device, steps, f"--freeze-below {k}", evaluate=False)
            print(json.dumps(row), file=sys.stderr, flush=True)
            failed += [row] if "error" in row else []
            times[k] += [row["step_time_p50_s"]] if row.get("step_time_p50_s") else []
    return times, failed


@functools.cache
def _weight_scale(model: str) -> float:
    """The packaged model's weight scale (training/lr_scale.py), read on the CPU once."""
    from slimtune.model.loading import load_model
    from slimtune.training.lr_scale import weight_scale

    return weight_scale(load_model(model, device="cpu").model)


def default_rate(method: str, model: str = "default") -> str:
    """The method's current default rate on ``model`` (scaled to its weights by the
    method's exponent, training/lr_scale.py), spelt as a run records it ("auto" for a
    method whose default is its range test, as full's is)."""
    from slimtune.training.lr_scale import scaled_default_lr

    cls = METHOD_CLASSES[method]
    if cls.auto_lr:
        return "auto"
    scale = _weight_scale(model) if cls.lr_weight_exponent else 1.0
    return _rate(scaled_default_lr(cls, scale))


def _rate(lr: str | float) -> str:
    """One spelling per rate ("1e-3", "0.001" and 1e-3 are the same run, 1.78e-4 stays
    itself); "auto" as is."""
    if lr == "auto":
        return lr
    if float(lr) >= 0.1:
        return f"{float(lr):g}"
    mantissa, exponent = f"{float(lr):.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _order(lr: str) -> float:
    return math.inf if lr == "auto" else float(lr)


def table(rows: list[dict], tag: str = "") -> str:
    """Per model and task: the mean score (and spread over seeds) at each learning rate
    (``auto``: ``--lr auto``), of the runs tagged ``tag``."""
    lines = []
    ok = [
        {**r, "lr": _rate(r["lr"])}
        for r in rows
        if r.get("score") is not None and r.get("tag", "") == tag
    ]
    for model, task in sorted({(r["model"], r["task"]) for r in ok}):
        sel = [r for r in ok if r["model"] == model and r["task"] == task]
        lrs = sorted({r["lr"] for r in sel}, key=_order)
        lines += [f"\n{model}, {task} ({TASKS[task][2].removeprefix('eval_')}, %)\n"]
        lines += ["| method | " + " | ".join(lrs) + " | default (lr) | best - default |"]
        lines += ["|---" * (len(lrs) + 3) + "|"]
        for method in [m for m in METHODS if any(r["method"] == m for r in sel)]:
            cells, means = [], {}
            try:  # the packaged model read for its weight scale
                default = default_rate(method, model)
            except Exception as e:  # a table must not need the model
                print(f"{model}: no default rate for {method} ({e})", file=sys.stderr)
                default = None
            for lr in [*lrs, "default"]:
                got = [
                    100 * r["score"]
                    for r in sel
                    if r["method"] == method
                    and (r["lr"] == default if lr == "default" else r["lr"] == lr)
                ]
                if not got:
                    cells.append("-")
                    continue
                means[lr] = statistics.mean(got)
                sd = f" ± {statistics.stdev(got):.1f}" if len(got) > 1 else ""
                cells.append(f"{means[lr]:.1f}{sd}")
            if cells[-1] != "-":
                cells[-1] += f" ({default})"
            swept = [means[lr] for lr in lrs if lr in means and lr != "auto"]
            gap = f"{max(swept) - means['default']:+.1f}" if swept and "default" in means else "-"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="default,gemma3-270m")
    ap.add_argument("--tasks", default="intents,extract")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--lrs", default=LRS + ",default", help="'default': the method's current default"
    )
    ap.add_argument("--full-lrs", default=FULL_LRS + ",default", help="for the full method")
    ap.add_argument(
        "--method-lrs",
        default="",
        help="per-method learning rates instead, e.g. 'lora=1e-3,3e-4;full=1e-4'",
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=None, help="default: train's own")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs/lr_sweep")
    ap.add_argument(
        "--flags", default="", help="more train flags for every run, e.g. '--quantize nf4'"
    )
    ap.add_argument("--tag", default="", help="names the runs with --flags (their own tables)")
    ap.add_argument("--table", help="print the tables of this results.jsonl and exit")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines()]
        print(table(rows, args.tag))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = []
    if results.exists():
        done = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    keys = ("model", "task", "method", "lr", "seed", "tag")
    have = {
        tuple(_rate(r[k]) if k == "lr" else r.get(k, "") for k in keys)
        for r in done
        if "error" not in r
    }
    jobs = []
    for model, task, method, seed in itertools.product(
        args.models.split(","), args.tasks.split(","), args.methods.split(","),
        [int(s) for s in args.seeds.split(",")],
    ):  # fmt: skip
        lrs = args.full_lrs if method == "full" else args.lrs
        lrs = dict(kv.split("=", 1) for kv in args.method_lrs.split(";") if kv).get(method, lrs)
        for lr in lrs.split(","):
            # recorded as the number (so results outlive a changed default), in one spelling
            lr = default_rate(method, model) if lr == "default" else _rate(lr)
            job = dict(zip(keys, (model, task, method, lr, seed, args.tag), strict=True))
            if tuple(job.values()) not in have:
                jobs.append(job)
    print(f"{len(jobs)} runs to do ({len(have)} done)", file=sys.stderr, flush=True)
    # the larger model's runs first, so the pool does not end on them alone
    jobs.sort(key=lambda j: j["model"] == "default")
    with ThreadPoolExecutor(args.jobs) as pool, results.open("a") as f:
        futures = [pool.submit(run_one, j, out, args.device, args.steps, args.flags) for j in jobs]
        for future in as_completed(futures):
            row = future.result()
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), file=sys.stderr, flush=True)
            done.append(row)
    print(table(done, args.tag))


if __name__ == "__main__":
    main()
