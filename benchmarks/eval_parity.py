"""Which part of classification scoring differs between devices? (issue 18)

A sparse delta trained on Gemma 3 scored 96.3% on the bundled intents test split when
evaluated on the CPU and 91.3% when the same delta was evaluated on an H200 (and a delta
trained on the GPU: 95.0% on the CPU, 90.4% on the GPU), while training itself agreed
across devices (``device_parity.py``). Scoring left-pads each batch of prompts, so padded
rows attend to nothing in the first forward; training right-pads. This scores the split
with the base alone, then with ``--delta`` applied, under the cases below, one JSON line
per case as it finishes, to compare with the same command on the CPU:

- ``sdpa:B``: torch's SDPA as slimtune runs it, batch size B (1: no padding at all);
- ``math:B`` / ``efficient:B``: SDPA held to torch's math or memory-efficient kernel (the
  mask guard on);
- ``eager:B``: transformers' own attention, no SDPA;
- ``unfixed:B``: as slimtune scored before ``slimtune/model/masks.py``: transformers' own
  mask (pad rows attend to nothing) and torch's choice of kernel;
- ``full:B``: a reference that shares nothing with slimtune's scorer: every (prompt,
  label) pair as one right-padded sequence, no KV cache, B prompts' pairs per forward.

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

CASES = "base,sdpa:16,sdpa:1,math:16,efficient:16,eager:16,full:16"


@contextlib.contextmanager
def as_before(guard: bool = False):
    """Scoring as slimtune did before ``slimtune/model/masks.py``: whatever SDPA kernel torch
    picks for left-padded batches, and (unless ``guard``) transformers' own masks."""
    from slimtune.eval import evaluate
    from slimtune.model import masks

    @contextlib.contextmanager
    def guard_only(device):
        token = masks._GUARD_ON.set(guard)
        try:
            yield
        finally:
            masks._GUARD_ON.reset(token)

    masks.install_mask_guard()
    exact = evaluate.padded_inference
    evaluate.padded_inference = guard_only
    try:
        yield
    finally:
        evaluate.padded_inference = exact


@contextlib.contextmanager
def held_to(backend):
    """SDPA held to one kernel, with the mask guard on."""
    from torch.nn.attention import sdpa_kernel

    with as_before(guard=True), sdpa_kernel([backend]):
        yield


def kernel(name: str):
    """A context holding SDPA to one kernel (``math``, ``efficient``), or to the stock
    mask (``unfixed``), or none."""
    from torch.nn.attention import SDPBackend

    if name == "unfixed":
        return as_before()
    backends = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return held_to(backends[name]) if name in backends else contextlib.nullcontext()


def full_sequence_scores(model, tok, prompts: list[str], labels: list[str], bs: int):
    """Log-likelihood of each label after each prompt, ``[n, n_labels]``, from whole
    right-padded sequences with no cache: the scorer's answer computed another way."""
    import torch

    from slimtune.eval.evaluate import _prompt_ids

    dev = next(model.parameters()).device
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    lab_ids = [list(tok(lab, add_special_tokens=False)["input_ids"]) + eos for lab in labels]
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), bs):
            pairs = [(_prompt_ids(tok, p, None), t) for p in prompts[i : i + bs] for t in lab_ids]
            width = max(len(p) + len(t) for p, t in pairs)
            ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, (p, t) in enumerate(pairs):
                ids[j, : len(p) + len(t)] = torch.tensor(p + t)
                mask[j, : len(p) + len(t)] = 1
            logp = torch.log_softmax(
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1
            ).cpu()
            for j, (p, t) in enumerate(pairs):
                at = torch.arange(len(p) - 1, len(p) + len(t) - 1)
                out.append(float(logp[j, at, torch.tensor(t)].sum()))
    return torch.tensor(out).view(len(prompts), len(labels))


def parse_cases(spec: str) -> list[tuple[str, str, int]]:
    """``base,sdpa:16,...`` as (case, kernel name, batch size); ``base`` only first (the
    delta, once applied, stays on), unknown names refused."""
    names = ("base", "sdpa", "math", "efficient", "eager", "unfixed", "full")
    cases = []
    for case in (c.strip() for c in spec.split(",") if c.strip()):
        name, _, bs = case.partition(":")
        if name not in names or not (bs or "16").isdigit() or (name == "base" and cases):
            raise SystemExit(
                f"--cases: {case!r}: use base (first) or NAME[:BATCH], NAME in {names[1:]}"
            )
        cases.append((case, name, int(bs or 16)))
    return cases


def full_case(model, tok, records, labels: list[str], bs: int) -> dict:
    """``classification_accuracy``'s fields from ``full_sequence_scores``."""
    from slimtune.eval.evaluate import label_token_counts

    scores = full_sequence_scores(model, tok, [r.fields["prompt"] for r in records], labels, bs)
    gold = [labels.index(r.fields["completion"]) for r in records]
    correct = [int(p == g) for p, g in zip(scores.argmax(-1).tolist(), gold)]
    n_tok = label_token_counts(tok, labels)
    loss = -float(sum(scores[i, g] for i, g in enumerate(gold))) / sum(n_tok[g] for g in gold)
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "gold_loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--delta", required=True, help="a delta folder of any method; none: the base throughout"
    )
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
        if name != "base" and not applied and args.delta != "none":
            model = apply_delta(model, args.delta, fingerprint(model)).model
            applied = True
        base_model(model).set_attn_implementation("eager" if name == "eager" else "sdpa")
        t0 = time.perf_counter()
        try:
            with kernel(name):
                if name == "full":
                    d = full_case(model, tok, test.records, labels, bs)
                else:
                    d = classification_accuracy(
                        model, tok, test.records, labels=labels, batch_size=bs
                    )
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
