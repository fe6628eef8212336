"""The ``+router`` probe of bench_methods.py against the function it replaces, on the CPU.

``_compile_routers`` swaps ``experts/fused.py``'s ``DenseRouteFunction`` for the same math
as plain ops under ``torch.compile``. This runs both on one random routing problem (some
rows padding, so the kept-rows scatter runs too) and prints the largest difference of each
output and of the input's and router weight's gradients. On the CPU both take the
projection out of the matmul the same way; on CUDA the function keeps it in fp32 and the
probe rounds it to bf16 (see the probe's docstring), which this cannot show.

    python benchmarks/router_probe_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import bench_methods  # benchmarks/, this script's folder

from slimtune.methods.experts import fused


def run(fn, flat0, w0, center, kept, rows, weights) -> list[torch.Tensor]:
    flat, w = flat0.clone().requires_grad_(), w0.clone().requires_grad_()
    dense, aux, top_i, gates, counts = fn.apply(
        flat, w, center, kept, rows, 2, 4, 2.0, torch.float32
    )
    ((dense * weights).sum() + 3 * aux).backward()
    return [dense.detach(), aux.detach(), top_i, gates.detach(), counts, flat.grad, w.grad]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows, n, d, experts = 60, 50, 64, 8
    flat = torch.randn(n, d, generator=g)
    w = torch.randn(experts, d, generator=g) / 8
    center = torch.randn(d, generator=g) / 10
    kept = torch.randperm(rows, generator=g)[:n].sort().values  # 10 rows of padding
    weights = torch.randn(rows, experts * 4, generator=g)
    original = run(fused.DenseRouteFunction, flat, w, center, kept, rows, weights)
    bench_methods._compile_routers()
    probe = run(fused.DenseRouteFunction, flat, w, center, kept, rows, weights)
    names = ["dense gates", "aux loss", "chosen", "gates", "counts", "grad x", "grad W"]
    for name, a, b in zip(names, original, probe):
        print(f"{name}: max |difference| {(a.double() - b.double()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
