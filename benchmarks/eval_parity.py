"""Which part of classification scoring differs between devices? (issue 18)

A sparse delta trained on Gemma 3 scored 96.3% on the bundled intents test split when
evaluated on the CPU and 91.3% when the same delta was evaluated on an H200 (and a delta
trained on the GPU: 95.0% on the CPU, 90.4% on the GPU), while training itself agreed
across devices (``device_parity.py``). Scoring left-pads each batch of prompts, so padded
rows attend to nothing in the first forward; training right-pads. This scores the split
with the base alone, then with ``--delta`` applied, under the cases below, one JSON line
per case as it finishes, to compare with the same command on the CPU:

- ``sdpa:B``: torch's SDPA as slimtune runs it, batch size B (1: no padding at all);
- ``math:B`` / ``efficient:B``: SDPA held to torch's math or memory-efficient kernel;
- ``eager:B``: transformers' own attention, no SDPA.

    python benchmarks/eval_parity.py --delta DIR --device cuda
    python benchmarks/eval_parity.py --delta DIR --device cpu --cases base,sdpa:16,eager:16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import TASKS  # benchmarks/, the script's folder

CASES = "base,sdpa:16,sdpa:1,math:16,efficient:16,eager:16"


def kernel(name: str):
    """A context holding SDPA to one kernel (``math``, ``efficient``), or none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([backends[name]]) if name in backends else contextlib.nullcontext()


def parse_cases(spec: str) -> list[tuple[str, str, int]]:
    """``base,sdpa:16,...`` as (case, kernel name, batch size); ``base`` only first (the
    delta, once applied, stays on), unknown names refused."""
    names = ("base", "sdpa", "math", "efficient", "eager")
    cases = []
    for case in (c.strip() for c in spec.split(",") if c.strip()):
        name, _, bs = case.partition(":")
        if name not in names or not (bs or "16").isdigit() or (name == "base" and cases):
            raise SystemExit(
                f"--cases: {case!r}: use base (first) or NAME[:BATCH], NAME in {names[1:]}"
            )
        cases.append((case, name, int(bs or 16)))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--delta", required=True, help="a delta folder of any method")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--cases", default=CASES, help=f"default: {CASES}")
    args = ap.parse_args()

    from slimtune.data import load_dataset
    from slimtune.delta.apply import apply_delta
    from slimtune.eval.evaluate import classification_accuracy, label_set
    from slimtune.model.anatomy import base_model
    from slimtune.model.loading import fingerprint, load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    data, eval_data, _ = TASKS["intents"]
    train, test = load_dataset(data, tok), load_dataset(eval_data, tok)
    labels = label_set(train.records + test.records)
    cases = parse_cases(args.cases)
    applied = False
    for case, name, bs in cases:
        if name != "base" and not applied:
            model = apply_delta(model, args.delta, fingerprint(model)).model
            applied = True
        base_model(model).set_attn_implementation("eager" if name == "eager" else "sdpa")
        t0 = time.perf_counter()
        try:
            with kernel(name):
                d = classification_accuracy(model, tok, test.records, labels=labels, batch_size=bs)
        except RuntimeError as e:  # e.g. the memory-efficient kernel, which the CPU lacks
            print(json.dumps({"device": args.device, "case": case, "error": str(e)[:200]}))
            continue
        row = {
            "device": args.device,
            "dtype": args.dtype,
            "case": case,
            "accuracy": round(d["accuracy"], 4),
            "gold_loss": round(d["gold_loss"], 4),
            "wrong": [i for i, c in enumerate(d["correct"]) if not c],
            "s": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
