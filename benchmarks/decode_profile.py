"""Per-token decode time of a SmolLM2-135M-shaped model (random weights: the time depends
on the shapes only), plain and with an unmerged LoRA adapter (as ``train``'s evaluation and
``serve`` run a delta), with and without cuDNN's attention, and a profile of a few decode
steps: the question is what sets the pace of a small model's generation on a GPU.

    python benchmarks/decode_profile.py [--device cuda] [--tokens 32]

Uses slimtune's own ``decode_latency`` (KV cache, greedy, batch 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SMOLLM2_135M = dict(  # SmolLM2-135M's config.json
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100000.0,
)


class Tokenizer:
    """The little of a tokenizer ``decode_latency`` needs: fixed ids for the prompt."""

    def __call__(self, text: str, **kwargs):
        return {"input_ids": [(7 * i + 11) % 4000 + 100 for i in range(48)]}


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.methods import get_method

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dev, dtype).eval()
    cuda = dev.type == "cuda"
    print("| model | attention | decode p50 (ms/token) | p95 | prefill (ms) |")
    print("|---|---|---|---|---|")
    profiles = [("plain", latency_rows("plain", model, cuda, args.tokens))]
    # peft wraps the model in place: the plain rows come first
    lora = get_method("lora", {"r": 8}).prepare(model, list(range(30))).eval()
    profiles.append(("lora, unmerged", latency_rows("lora, unmerged", lora, cuda, args.tokens)))
    for name, text in profiles:
        print(f"\n-- {name}: 4 decode steps, no cuDNN; {text}")


def latency_rows(name: str, m: torch.nn.Module, cuda: bool, tokens: int) -> str:
    """Print ``m``'s decode rows (each attention setting); return a profile of 4 steps."""
    from transformers import DynamicCache

    from slimtune.eval.evaluate import decode_latency, with_cache

    for cudnn in (True, False) if cuda else (False,):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        r = decode_latency(m, Tokenizer(), "", new_tokens=tokens, repeats=3)
        print(
            f"| {name} | {'torch (cuDNN)' if cudnn else 'no cuDNN'} | "
            f"{r['latency_p50_ms']:.2f} | {r['latency_p95_ms']:.2f} | {r['prefill_ms']:.2f} |",
            flush=True,
        )
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev = next(m.parameters()).device
    ids = torch.tensor([Tokenizer()("")["input_ids"]], device=dev)
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
