"""The fused expert kernel (Triton on a GPU, C on CPU), the grouped GEMM by expert set and by
expert against an fp32 reference on one linear (prefill and decode sizes), and the time of
one linear's adapter update next to a dense LoRA's; on a GPU also a whole small model with
left padding and training gradients by expert set against by expert.

    python benchmarks/expert_kernel_check.py              # GPU: 2048 -> 8192 etc., bf16
    python benchmarks/expert_kernel_check.py --device cpu  # the default model's shapes, fp32
"""

from __future__ import annotations

import time

import torch

from slimtune.methods.experts import attached
from slimtune.methods.experts import cpu_kernel as expert_cpu
from slimtune.methods.experts import cuda_kernel as expert_kernel
from slimtune.methods.experts import layer as X


def linear_case(
    tokens: int,
    d_in: int,
    d_out: int,
    experts: int,
    k: int,
    rank: int,
    dtype: torch.dtype,
    device: str = "cuda",
) -> dict:
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False).to(device, dtype).requires_grad_(False)
    router = X.ExpertRouter(d_in, experts, k).to(device)
    ex = X.ExpertLinear(lin, router, rank, 2.0 * rank).to(device, dtype).requires_grad_(False)
    router.requires_grad_(False)
    with torch.no_grad():
        ex.lora_B.normal_(0, 0.02)
    x = torch.randn(1, tokens, d_in, device=device, dtype=dtype)
    res = {}
    with torch.no_grad():
        router.current = router.route(x)
        for name, fused, sets in (
            ("fused", True, True),
            ("sets", False, True),
            ("gathered", False, False),
        ):
            X.FUSED_KERNEL, X.EXPERT_SET_DEVICES = fused, {device} if sets else set()
            router.current._gathered.clear()
            res[name] = ex(x).float()
        X.FUSED_KERNEL, X.EXPERT_SET_DEVICES = True, {"cuda"}
        r = router.current  # fp32 reference from the same routing
        xf, base = x[0].float(), lin(x)[0].float()
        ref = base.clone()
        a, b = ex.lora_A.float(), ex.lora_B.float()
        for e in range(experts):
            rows = (r.chosen == e).nonzero()
            tok, slot = rows[:, 0], rows[:, 1]
            g = r.weights[tok, slot].float().unsqueeze(1) * ex.scaling
            ref.index_add_(0, tok, (xf[tok] @ a[e].t() * g) @ b[e].t())
    delta = (ref - base).norm()
    out = {f"{name}_rel_err": ((res[name][0] - ref).norm() / delta).item() for name in res}

    # timing of the adapter update alone (base output recomputed outside the timed part)
    def timed(fn, reps=20):
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps * 1e3

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    y = lin(x)[0]
    xf = x[0]
    plan = r.plan()
    a16 = torch.randn(k * rank, d_in, device=device, dtype=dtype) / d_in**0.5
    b16 = torch.randn(d_out, k * rank, device=device, dtype=dtype) * 0.02
    kernel = expert_kernel if device == "cuda" else expert_cpu
    with torch.no_grad():
        out["fused_ms"] = timed(
            lambda: kernel.add_routed_lowrank(xf, y, ex.lora_A, ex.lora_B, plan, ex.scaling)
        )

        def gathered():
            r._gathered.clear()
            h = X.expert_lowrank(
                r.gather(x), ex.lora_A, ex.lora_B, r.gates * ex.scaling, r, inference=True
            )
            X._add_rows(y.view(-1, d_out), r.tokens, h.to(y.dtype))

        out["gathered_ms"] = timed(gathered)
        sets = r.expert_sets(rank)
        if sets is not None:

            def by_set():
                r._gathered.clear()
                h = X.set_lowrank(r.gather_sets(x), ex.lora_A, ex.lora_B, sets, ex.scaling)
                X._add_rows(y.view(-1, d_out), sets.tokens, h.to(y.dtype))

            out["sets_ms"] = timed(by_set)
        out["plan_ms"] = timed(lambda: expert_kernel.plan_tiles(r.chosen, r.weights, None, experts))
        out["lora_peft_style_ms"] = timed(lambda: y + (xf @ a16.t()) @ b16.t() * 2.0)
        out["lora_addmm_ms"] = timed(lambda: y.addmm_(xf @ a16.t(), b16.t(), alpha=2.0))
    return out


def grad_case() -> dict:
    """Training: gradients through the expert-set path against the per-expert path."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(2048, 2048, bias=False).cuda().to(torch.bfloat16).requires_grad_(False)
    router = X.ExpertRouter(2048, 8, 2).cuda()
    ex = X.ExpertLinear(lin, router, 8, 16.0).cuda()
    with torch.no_grad():
        ex.lora_B.normal_(0, 0.02)
    x = torch.randn(4, 1024, 2048, device="cuda", dtype=torch.bfloat16)
    res = {}
    for sets in (True, False):
        X.EXPERT_SET_DEVICES = {"cuda"} if sets else set()
        for p in (ex.lora_A, ex.lora_B, router.weight):
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            router.current = router.route(x)
            y = ex(x)
        (y.float().pow(2).mean() + router.last_aux).backward()
        res[sets] = (
            y.float(),
            ex.lora_A.grad.clone(),
            ex.lora_B.grad.clone(),
            router.weight.grad.clone(),
            router.current._sets not in (None, False),
        )
    X.EXPERT_SET_DEVICES = {"cuda"}
    out = {"set_path_used": res[True][4], "per_expert_path_used_sets": res[False][4]}
    for i, name in enumerate(("output", "grad_A", "grad_B", "grad_router")):
        a, b = res[True][i], res[False][i]
        out[f"{name}_rel_diff"] = ((a - b).norm() / b.norm()).item()
    return out


def model_case() -> dict:
    from slimtune.methods import get_method
    from slimtune.testing import tiny_llama

    model = tiny_llama(500, layers=2, hidden=256, seed=0).cuda().to(torch.bfloat16)
    get_method("experts", {"experts": 8, "top_k": 2, "rank": 8}).prepare(
        model, [0]
    )  # no flips downstream
    with torch.no_grad():
        for lin in attached(model).linears.values():
            lin.lora_A.data = lin.lora_A.data.to(torch.bfloat16)
            lin.lora_B.data = (torch.randn_like(lin.lora_B) * 0.05).to(torch.bfloat16)
    model.eval()
    ids = torch.randint(0, 500, (4, 100), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    outs = {}
    with torch.no_grad():
        for fused in (True, False):
            X.FUSED_KERNEL = fused
            outs[fused] = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    diff = (outs[True] - outs[False])[keep]
    return {
        "model_logits_max_abs_diff_fused_vs_gathered": diff.abs().max().item(),
        "model_logits_scale": outs[False][keep].abs().mean().item(),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    def show(label, case):
        print(label, {k: round(v, 5) if isinstance(v, float) else v for k, v in case.items()})

    if args.device == "cpu":
        print("torch", torch.__version__, "CPU threads", torch.get_num_threads())
        for tokens in (1024, 8):
            for d_in, d_out in ((576, 1536), (1536, 576)):
                show(
                    f"linear {d_in}->{d_out}, {tokens} tokens, fp32, E=8 k=2 r=8:",
                    linear_case(tokens, d_in, d_out, 8, 2, 8, torch.float32, "cpu"),
                )
        show("E=8 k=4, 1024 tokens:", linear_case(1024, 576, 1536, 8, 4, 8, torch.float32, "cpu"))
        show("E=32 k=2, 1024 tokens:", linear_case(1024, 576, 1536, 32, 2, 8, torch.float32, "cpu"))
        return
    import triton

    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
    for tokens in (16384, 8):
        for dtype in (torch.bfloat16, torch.float32):
            show(
                f"linear 2048->8192, {tokens} tokens, {str(dtype)[6:]}, E=8 k=2 r=8:",
                linear_case(tokens, 2048, 8192, 8, 2, 8, dtype),
            )
    show("E=32 k=2, 16384 tokens, bf16:", linear_case(16384, 2048, 8192, 32, 2, 8, torch.bfloat16))
    show("E=8 k=4, 16384 tokens, bf16:", linear_case(16384, 2048, 8192, 8, 4, 8, torch.bfloat16))
    show(
        "down 8192->2048, 16384 tokens, bf16:",
        linear_case(16384, 8192, 2048, 8, 2, 8, torch.bfloat16),
    )
    print(model_case())
    print("training, sets vs per-expert:", grad_case())


if __name__ == "__main__":
    main()
