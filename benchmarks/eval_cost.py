"""What `train`'s final evaluation costs on the default model, and what the three cheaper
ways of doing it buy: classification scoring with the prompts' shared instruction run once
and batches formed by length, against one forward per left-padded batch in file order;
greedy generation (the extraction task's, 10 new tokens: a trained model's answer
length) with the shared instruction run once, against batches of 8 in file order; the
decode-latency measurement under its time budget after a 4-step warm-up, against three
timed rounds after a whole warm-up round (the measurement before 2026-11-29).

    python benchmarks/eval_cost.py [--device cpu] [--threads 1] [--examples 72] [--rounds 2]
                                   [--dtype float32]

Each variant runs ``--rounds`` times in turn, on the same model in one process; the table
gives the median seconds and each cheap variant against the one before it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from slimtune import load_model
    from slimtune.data import load_dataset
    from slimtune.eval import evaluate as ev

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--examples", type=int, default=72, help="intents test examples scored")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="the weights' dtype (default: load_model's)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    base = load_model("default", device=args.device, dtype=args.dtype)
    model, tok = base.model, base.tokenizer
    ds = load_dataset("builtin:support_intents_test", tok)
    records = ds.records[: args.examples]
    prompts = [r.fields["prompt"] for r in records]
    labels = ev.label_set(ds.records)

    def before(fn, items: list, size: int) -> list:
        """``fn`` per batch of ``size`` in file order, nothing shared: the code before (a
        batch sorted alone keeps its padding)."""
        keep = ev.MIN_SHARED_PREFIX
        ev.MIN_SHARED_PREFIX = 10**9
        try:
            return [fn(items[i : i + size]) for i in range(0, len(items), size)]
        finally:
            ev.MIN_SHARED_PREFIX = keep

    def score(shared: bool):
        def run(ps):
            return ev.score_labels(model, tok, ps, labels, max_length=ds.max_length)

        return run(prompts) if shared else torch.cat(before(run, prompts, 16))

    extract = load_dataset("builtin:support_extract_test", tok)
    gen_prompts = [r.fields["prompt"] for r in extract.records[: args.examples]]

    def answers(shared: bool):
        def run(ps):  # a trained model's answers are ~10 tokens
            return ev.generate(model, tok, ps, max_new_tokens=10)

        if shared:
            return run(gen_prompts)
        return [a for part in before(run, gen_prompts, 8) for a in part]

    def latency(budgeted: bool):
        prompt = prompts[0]
        if budgeted:
            return ev.decode_latency(model, tok, prompt, max_length=ds.max_length)
        return ev.decode_latency(
            model, tok, prompt, max_length=ds.max_length, warmup_tokens=32, max_seconds=1e9
        )

    variants = {
        "scoring, one forward per padded batch": lambda: score(False),
        "scoring, shared instruction once, by length": lambda: score(True),
        "generation, 10 tokens, one batch of 8 at a time": lambda: answers(False),
        "generation, shared instruction once, by length": lambda: answers(True),
        "latency, 3 rounds after a warm-up round": lambda: latency(False),
        "latency, 2 s budget after 4 steps": lambda: latency(True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, object] = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    a, b = (results[n] for n in list(variants)[:2])
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    same = int((a.argmax(-1) == b.argmax(-1)).sum())
    g1, g2 = (results[n] for n in list(variants)[2:4])
    assert isinstance(g1, list) and isinstance(g2, list)
    same_answers = sum(x == y for x, y in zip(g1, g2))
    print(
        f"\ndefault model ({next(model.parameters()).dtype}), {args.device}"
        + (f" ({args.threads} threads)" if args.device == "cpu" else "")
        + f", {len(prompts)} intents test examples, {args.rounds} rounds; "
        f"scores differ by at most {float((a - b).abs().max()):.1e}, "
        f"the same label chosen for {same} of {len(prompts)}; the same answer for "
        f"{same_answers} of {len(gen_prompts)} extraction prompts\n"
    )
    print("| variant | median s | vs the one before | detail |")
    print("|---|---|---|---|")
    prev = None
    for i, name in enumerate(variants):
        med = statistics.median(times[name])
        ratio = f"{med / prev:.2f}x" if i % 2 and prev else ""
        r = results[name]
        detail = (
            f"p50 {r['latency_p50_ms']:.1f} ms over {r['latency_steps']} steps"
            if isinstance(r, dict)
            else ""
        )
        print(f"| {name} | {med:.2f} | {ratio} | {detail} |")
        prev = med


if __name__ == "__main__":
    main()
