"""Run by tests/test_expert_kernel.py in a subprocess under Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before the kernel is defined, so not in-process):
compares the fused kernel's logits with the gathered path's and prints the numbers as JSON."""

import json

import torch

from slimtune.methods import get_method
from slimtune.methods.experts import attached
from slimtune.methods.experts import cuda_kernel as expert_kernel
from slimtune.methods.experts import layer as X
from slimtune.testing import tiny_llama


def logits(model, ids, mask, fused: bool) -> torch.Tensor:
    X.FUSED_KERNEL = fused
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def check(
    experts: int,
    top_k: int,
    rank: int,
    batch: int,
    seq: int,
    dtype: torch.dtype = torch.float32,
    layers: tuple = (0, 1),
) -> dict:
    model = tiny_llama(300, layers=2, seed=0).to(dtype)
    get_method("experts", {"experts": experts, "top_k": top_k, "rank": rank}).prepare(
        model, list(layers)
    )
    att = attached(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in att.linears.values():
            lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=gen) * 0.5)
            lin.lora_A.data, lin.lora_B.data = lin.lora_A.data.to(dtype), lin.lora_B.data.to(dtype)
    model.eval()
    ids = torch.randint(0, 300, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0  # left padding: those tokens are not routed
    calls = []
    kernel = expert_kernel.add_routed_lowrank

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    expert_kernel.add_routed_lowrank = counted
    fused = logits(model, ids, mask, True)
    expert_kernel.add_routed_lowrank = kernel
    gathered = logits(model, ids, mask, False)
    att.remove()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    return {
        "kernel_calls": len(calls),
        "layers": len(layers),
        "max_diff": (fused - gathered)[keep].abs().max().item(),
        "adapter_effect": (gathered - base)[keep].abs().max().item(),
        "scale": gathered[keep].abs().max().item(),
    }


def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernel here, if it cannot: some releases
    (3.5, 3.6) pass scalar arguments as 1-element arrays, which NumPy >= 2.3 will not turn
    into loop bounds."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(ptr, n, BK: tl.constexpr):
        for k0 in range(0, n, BK):
            tl.store(ptr + k0 + tl.arange(0, BK), tl.zeros((BK,), tl.float32))

    try:
        probe[(1,)](torch.empty(8), 8, BK=4)
    except Exception as e:
        return f"triton {triton.__version__}'s interpreter fails a plain loop ({e})"
    return None


if __name__ == "__main__":
    problem = interpreter_problem()
    if problem:
        print(json.dumps({"skip": problem}))
        raise SystemExit(0)
    cases = {
        "prefill": (8, 2, 8, 3, 40),
        "decode": (8, 2, 8, 3, 1),
        "k3_rank5": (6, 3, 5, 4, 30),
        "k1": (4, 1, 4, 2, 50),
        # half precision: the rank-space product is cast down before meeting B (bf16
        # is the GPU case, but the interpreter's dot does not take bf16); one adapted
        # layer, so rounding cannot flip a later layer's routing
        "fp16": (8, 2, 8, 3, 40, torch.float16, (0,)),
    }
    print(json.dumps({name: check(*args) for name, args in cases.items()}))
