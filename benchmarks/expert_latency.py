"""Inference latency of routed expert adapters against dense LoRA, one process, one base.

For E experts of rank r with top-k routing the two dense anchors are
  (a) LoRA of rank E*r: the same total adapter parameters,
  (b) LoRA of rank k*r: the same active adapter parameters per token.
Every configuration is attached to the same base model in turn (LoRA through peft, dropout
0, adapters in the model's dtype), timed, and taken off again. Two measurements:
  prefill: one forward over a batch (no grad), median of --reps;
  decode:  one new token at a time with a KV cache after a 64-token prompt, median per token.
Times are medians over --rounds passes that interleave all configurations; ratios are
against the bare base model of the same run.

    python benchmarks/expert_latency.py --device cpu --model default --rank 8
    python benchmarks/expert_latency.py --device cuda --model llama-1.2b --rank 8,32 \\
        --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_methods import build_model, machine


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def attach(model, kind: str, options: dict, device: str):
    """Attach one adapter; return (model to run, undo)."""
    from slimtune.methods import get_method
    from slimtune.methods.experts import attached

    if kind == "base":
        return model, lambda: model
    n = len(model.model.layers)
    if kind == "lora":
        m = get_method(
            "lora",
            {
                "r": options["r"],
                "alpha": 2.0 * options["r"],
                "dropout": 0.0,
                "adapter_dtype_follows_base": True,
            },
        )
        wrapped = m.prepare(model, list(range(n)))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        wrapped.eval()
        return wrapped, lambda: wrapped.unload()
    m = get_method("experts", options)
    m.prepare(model, list(range(n)))
    att = attached(model)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for lin in att.linears.values():  # inference: adapters in the base dtype, B non-zero
            lin.lora_A.data = lin.lora_A.data.to(dtype)
            lin.lora_B.data = torch.randn_like(lin.lora_B, dtype=dtype) * 0.02
    model.eval()

    def undo():
        att.remove()
        return model

    return model, undo


def time_prefill(model, ids, reps: int, device: str) -> float:
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_decode(model, prompt, tokens: int, device: str) -> float:
    from transformers import DynamicCache

    from slimtune.model.anatomy import with_cache

    times = []
    with torch.no_grad():
        for _ in range(2):  # the first pass warms up
            cache = DynamicCache()
            out = model(input_ids=prompt, use_cache=True, **with_cache(model, cache))
            nxt = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(tokens):
                sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=nxt, use_cache=True, **with_cache(model, cache))
                nxt = out.logits[:, -1:].argmax(-1)
                sync(device)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def configs(rank: int, experts: int, top_k: int) -> list[tuple[str, str, dict]]:
    e = {"rank": rank, "alpha": 2.0 * rank}
    return [
        ("base model, no adapter", "base", {}),
        (f"(a) LoRA r={experts * rank}: same total params", "lora", {"r": experts * rank}),
        (f"(b) LoRA r={top_k * rank}: same active params", "lora", {"r": top_k * rank}),
        (
            f"experts E={experts} k={top_k} r={rank}",
            "experts",
            {**e, "experts": experts, "top_k": top_k},
        ),
        (f"experts E={experts} k=1 r={rank}", "experts", {**e, "experts": experts, "top_k": 1}),
        (
            f"experts E={experts} k={2 * top_k} r={rank}",
            "experts",
            {**e, "experts": experts, "top_k": 2 * top_k},
        ),
        (
            f"experts E={4 * experts} k={top_k} r={rank}",
            "experts",
            {**e, "experts": 4 * experts, "top_k": top_k},
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="default", help="default, llama-1.2b or llama-tiny")
    ap.add_argument("--rank", default="8", help="expert rank(s), comma-separated")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5, help="prefill passes per round")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes over all configurations; the table shows medians",
    )
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument(
        "--path",
        choices=("auto", "sets", "gathered", "loop"),
        default="auto",
        help="experts at inference: auto = the fused kernel (Triton on CUDA, C on "
        "CPU), else as sets; sets = grouped GEMM over expert sets where that pays, else "
        "as gathered; gathered = grouped GEMM over single experts + "
        "accumulate; loop = a loop over the experts",
    )
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    from slimtune.methods.experts import cpu_kernel as expert_cpu
    from slimtune.methods.experts import cuda_kernel as expert_kernel
    from slimtune.methods.experts import layer as experts

    experts.FUSED_KERNEL = args.path == "auto"
    experts.EXPERT_SET_DEVICES = (
        {"cuda", "cpu"} if args.path == "sets" else ({"cuda"} if args.path == "auto" else set())
    )
    experts.GROUPED_MM = args.path != "loop"
    model = build_model(args.model, args.device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    prompt = torch.randint(0, vocab, (1, 64), generator=gen).to(args.device)
    plan = [
        (rank, *c)
        for rank in [int(r) for r in args.rank.split(",")]
        for c in configs(rank, args.experts, args.top_k)
    ]
    samples: dict[int, dict] = {}
    # rounds interleave the configurations, so drift of the machine hits all of them alike
    for round_ in range(args.rounds):
        for i, (rank, label, kind, options) in enumerate(plan):
            run, undo = attach(model, kind, options, args.device)
            prefill = time_prefill(run, ids, args.reps, args.device)
            decode = time_decode(run, prompt, args.decode_tokens, args.device)
            adapter = sum(
                p.numel() for n, p in run.named_parameters() if "lora_" in n or "expert_router" in n
            )
            model = undo()
            rec = samples.setdefault(
                i,
                {
                    "rank": rank,
                    "config": label,
                    "kind": kind,
                    "options": options,
                    "adapter_params": adapter,
                    "prefill": [],
                    "decode": [],
                },
            )
            rec["prefill"].append(prefill)
            rec["decode"].append(decode)
            print(
                f"round {round_ + 1}: {label}: prefill {prefill:.4f}s decode {decode:.5f}s",
                file=sys.stderr,
                flush=True,
            )
    rows = [
        {
            **{k: v for k, v in r.items() if k not in ("prefill", "decode")},
            "prefill_s": statistics.median(r["prefill"]),
            "decode_s": statistics.median(r["decode"]),
            "prefill_samples": r["prefill"],
            "decode_samples": r["decode"],
        }
        for _, r in sorted(samples.items())
    ]
    probe = next(model.parameters())
    if experts.FUSED_KERNEL and expert_kernel.supports(
        probe, probe, probe, args.experts, args.top_k
    ):
        path = "the fused Triton kernel"
    elif experts.FUSED_KERNEL and expert_cpu.supports(
        probe, probe, probe.new_empty(1, 8), args.top_k
    ):
        path = "the fused C kernel"
    elif experts._grouped_ok(probe, inference=True):
        path = (
            "grouped GEMM over expert sets where they pay, else over experts"
            if probe.device.type in experts.EXPERT_SET_DEVICES
            else "grouped GEMM over experts + accumulate"
        )
    else:
        path = "per-expert loop"
    print(
        f"\n{machine(args.device)}; experts via {path}; model {args.model}; prefill batch {args.batch} x "
        f"{args.seq} tokens; decode 1 token with a KV cache after a 64-token prompt; "
        f"medians\n"
    )
    print(
        "| config | adapter params | prefill ms | prefill vs base | decode ms/token | "
        "decode vs base |"
    )
    print("|---|---|---|---|---|---|")
    for rank in sorted({r["rank"] for r in rows}):
        group = [r for r in rows if r["rank"] == rank]
        base = group[0]
        for r in group:
            print(
                f"| {r['config']} | {r['adapter_params']:,} | {1e3 * r['prefill_s']:.1f} | "
                f"{r['prefill_s'] / base['prefill_s']:.3f}x | {1e3 * r['decode_s']:.2f} | "
                f"{r['decode_s'] / base['decode_s']:.3f}x |"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"machine": machine(args.device), "args": vars(args), "rows": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
