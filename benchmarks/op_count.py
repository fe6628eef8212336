"""How many operators a training step dispatches per decoder layer, by method: the host
work a GPU step pays for on a small model, counted on the CPU (no GPU needed).

Counts the operators of one forward + backward under bf16 autocast on a bf16 tiny Llama
of 1 and 2 layers, every layer trained; the difference is one layer's. Two counts: the
top-level operators (Python-level calls: an autograd function with a written-out backward
counts once) and the innermost aten operators (those with no aten operator inside: about
the kernels a GPU step launches).
"lora" is slimtune's training path (``lora_fused``), "lora-peft" peft's own forward;
"experts" the dense expert path of a GPU step (``experts/fused.py``), "experts-unfused" the
same sum as plain operators (what it was before, and what ``--compile`` traces).

    python benchmarks/op_count.py
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def op_counts(method: str, options: dict, fused: bool, layers: int) -> tuple[int, int]:
    from slimtune.methods import get_method
    from slimtune.testing import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(64, layers=layers, hidden=32).to(torch.bfloat16)
    m = get_method(method, options)
    model = m.prepare(model, list(range(layers)))
    ids = torch.randint(0, 64, (8, 64))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
            aux = m.auxiliary_loss(model)
        (loss if aux is None else loss + aux).backward()

    # entered once, as the trainer does around its steps
    with m.compute_context(model) if fused else contextlib.nullcontext():
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    events = prof.events()
    top = sum(1 for e in events if e.cpu_parent is None)
    # aten operators with no aten operator inside: roughly the kernels a GPU would launch
    leaf = sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and not any(c.name.startswith("aten::") for c in e.cpu_children)
    )
    return top, leaf


ROWS = (  # name, method, options, under the method's compute context
    ("full", "full", {}, True),
    ("lora", "lora", {"r": 8}, True),
    ("lora-peft", "lora", {"r": 8}, False),
    # the GPU's dense expert path (dispatch auto picks it on CUDA), without calibration
    ("experts", "experts", {"dispatch": "dense", "calibration_batches": 0}, True),
    ("experts-unfused", "experts", {"dispatch": "dense", "calibration_batches": 0}, False),
)


def main() -> None:
    torch.set_num_threads(1)
    print("| method | top-level operators per layer | innermost aten operators per layer |")
    print("|---|---|---|")
    for name, method, options, fused in ROWS:
        (top2, leaf2), (top1, leaf1) = (op_counts(method, options, fused, n) for n in (2, 1))
        print(f"| {name} | {top2 - top1} | {leaf2 - leaf1} |")


if __name__ == "__main__":
    main()
