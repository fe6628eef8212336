"""Per-token decode time of a SmolLM2-135M-shaped model (random weights: the time depends
on the shapes only), plain, with an unmerged LoRA adapter through peft's forward (as
``serve`` runs a delta) and through slimtune's (as ``train``'s evaluation does), with and without cuDNN's attention, and a profile of a few decode
steps: the question is what sets the pace of a small model's generation on a GPU.

    python benchmarks/decode_profile.py [--device cuda] [--tokens 32]

Times decode as slimtune's ``decode_latency`` does (KV cache, greedy, batch 1), but each
timed round on a new prompt length (see ``decode_rounds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from bench_methods import build_model  # this folder's

    from slimtune.methods import get_method

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device(args.device)
    model = build_model("smollm2-135m", args.device).eval()
    cuda = dev.type == "cuda"
    print("| model | attention | decode p50 (ms/token) | p95 | prefill (ms) |")
    print("|---|---|---|---|---|")
    profiles = [("plain", latency_rows("plain", model, cuda, args.tokens))]
    # peft wraps the model in place: the plain rows come first
    method = get_method("lora", {"r": 8})
    lora = method.prepare(model, list(range(30))).eval()
    profiles.append(("lora, unmerged", latency_rows("lora, unmerged", lora, cuda, args.tokens)))
    # slimtune's own LoRA forward (lora_fused: no autograd function without gradients, the
    # adapters' compute copies made once), as train's evaluation runs it
    with method.compute_context(lora):
        name = "lora, slimtune's forward"
        profiles.append((name, latency_rows(name, lora, cuda, args.tokens)))
    for name, text in profiles:
        print(f"\n-- {name}: 4 decode steps, no cuDNN; {text}")


def decode_rounds(m: torch.nn.Module, tokens: int) -> dict[str, float]:
    """Per-token decode time, greedy, batch 1, KV cache, as ``evaluate.decode_latency``
    times it, but every timed round on a prompt length the warm-up did not see: generation
    in an evaluation meets new prompt and key lengths all the time, and a kernel that pays
    per shape (cuDNN's graph build) pays then, which a warm-up on the same prompt hides."""
    from transformers import DynamicCache

    from slimtune.eval.evaluate import percentile, with_cache

    dev = next(m.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps: list[float] = []
    prefill: list[float] = []
    for i, length in enumerate((40, 48, 61, 77)):  # the first warms up
        ids = torch.tensor([prompt_ids(length)], device=dev)
        cache = DynamicCache()
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            out = m(input_ids=ids, use_cache=True, **with_cache(m, cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            if i:
                prefill.append(time.perf_counter() - t0)
            for _ in range(tokens):
                t0 = time.perf_counter()
                out = m(input_ids=nxt, use_cache=True, **with_cache(m, cache))
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                if i:
                    steps.append(time.perf_counter() - t0)
    return {
        "p50": 1000 * percentile(steps, 50),
        "p95": 1000 * percentile(steps, 95),
        "prefill": 1000 * percentile(prefill, 50),
    }


def prompt_ids(length: int) -> list[int]:
    return [(7 * i + 11) % 4000 + 100 for i in range(length)]


def latency_rows(name: str, m: torch.nn.Module, cuda: bool, tokens: int) -> str:
    """Print ``m``'s decode rows (each attention setting); return a profile of 4 steps."""
    from transformers import DynamicCache

    from slimtune.eval.evaluate import with_cache

    for cudnn in (True, False) if cuda else (False,):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        r = decode_rounds(m, tokens)
        print(
            f"| {name} | {'torch (cuDNN)' if cudnn else 'no cuDNN'} | "
            f"{r['p50']:.2f} | {r['p95']:.2f} | {r['prefill']:.2f} |",
            flush=True,
        )
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev = next(m.parameters()).device
    ids = torch.tensor([prompt_ids(48)], device=dev)
    cache = DynamicCache()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=True, **with_cache(m, cache))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        with profile(activities=acts) as prof:
            for _ in range(4):
                out = m(input_ids=nxt, use_cache=True, **with_cache(m, cache))
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if cuda:
                torch.cuda.synchronize()
    events = prof.events()
    syncs = sum(1 for e in events if "Synchronize" in e.name)
    launches = sum(1 for e in events if "LaunchKernel" in e.name)
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50
    )
    return f"syncs {syncs}, kernel launches {launches}\n{table}"


if __name__ == "__main__":
    main()
