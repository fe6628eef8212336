"""LoRA's fused training path against peft's own forward, on the device it will run on
(CUDA: bf16 autocast, the adapter gradients written in fp32 by the GEMM itself): the loss,
every adapter gradient after one step, and the loss and weights after a few AdamW steps
(the compute copies must follow each step), and evaluation without gradients. Prints the
largest relative differences as JSON; the CPU tests check the same at fp32 tolerances.

    python benchmarks/lora_fused_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from bench_methods import build_model  # this folder's

    from slimtune.methods import get_method

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    ids = torch.randint(0, 49152, (4, 96), generator=torch.Generator().manual_seed(0)).to(dev)

    def run(fused: bool) -> dict:
        model = build_model("smollm2-135m", args.device).to(dtype)
        method = get_method("lora", {"r": 8, "dropout": 0.0})
        model = method.prepare(model, list(range(30)))
        with torch.no_grad():  # a non-zero B, so the first step's A gradients are not zero
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator(dev).manual_seed(1))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        ctx = method.compute_context(model) if fused else contextlib.nullcontext()
        losses, first_grads = [], None
        with ctx:
            for step in range(args.steps):
                with torch.autocast(dev.type, dtype=dtype):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                if step == 0:
                    first_grads = [p.grad.detach().float().clone() for p in params]
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            model.eval()
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype):
                eval_logits = model(input_ids=ids).logits.float()
        return {
            "losses": losses,
            "grads": first_grads,
            "weights": [p.detach().float() for p in params],
            "logits": eval_logits,
        }

    ref, fused = run(False), run(True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    out = {
        "device": str(dev),
        "loss_peft": ref["losses"],
        "loss_fused": fused["losses"],
        "first_step_grad_rel_max": max(rel(a, b) for a, b in zip(fused["grads"], ref["grads"])),
        "weights_rel_max_after_steps": max(
            rel(a - w0, b - w0)
            for a, b, w0 in zip(fused["weights"], ref["weights"], _initial(args, dev, dtype))
        ),
        "eval_logits_rel": rel(fused["logits"], ref["logits"]),
    }
    print(json.dumps(out, indent=1))


def _initial(args, dev, dtype) -> list[torch.Tensor]:
    """The adapters before the first step (the same seeds as ``run``), to compare updates."""
    from bench_methods import build_model

    from slimtune.methods import get_method

    model = get_method("lora", {"r": 8, "dropout": 0.0}).prepare(
        build_model("smollm2-135m", args.device).to(dtype), list(range(30))
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator(dev).manual_seed(1))
    return [p.detach().float() for p in model.parameters() if p.requires_grad]


if __name__ == "__main__":
    main()
