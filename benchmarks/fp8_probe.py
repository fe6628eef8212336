"""What would an fp8 frozen base buy a LoRA step? GEMM timings, no training.

A frozen base costs two GEMMs per decoder linear per step: ``x W^T`` forward and ``dy W``
backward (no weight gradient). This times both in bf16 and in fp8 e4m3 through
``torch._scaled_mm`` with rowwise scales (``W`` quantized once, per output channel for the
forward and per input channel for the backward, as a frozen base allows), the fp8 side
with and without its per-step casts of ``x`` and ``dy`` (eager and ``torch.compile``d),
and sums them over the layers of a shape. Needs a GPU with fp8 matrix units (Ada, Hopper).

    python benchmarks/fp8_probe.py
"""

from __future__ import annotations

import torch

SHAPES = {  # name: (tokens per step, hidden, intermediate, k/v width, layers)
    "llama-1.2b 4x2048": (8192, 2048, 8192, 512, 16),
    "llama-8b 2x2048": (4096, 4096, 14336, 1024, 32),
}
E4M3 = torch.float8_e4m3fn


def quant_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(E4M3).max
    return (t / s).to(E4M3), s


def timed_ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def linear_ms(tokens: int, k: int, n: int, compiled) -> tuple[dict[str, float], float]:
    """Milliseconds of one frozen linear's two GEMMs (``k`` in, ``n`` out) per step, and
    the fp8 forward's relative error (Gaussian inputs)."""
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, ws = quant_rows(w)  # per output channel: forward
    wtq, wts = quant_rows(w.t().contiguous())  # per input channel: backward

    def fp8(xq, xs, gq, gs):
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)
        dx = torch._scaled_mm(gq, wtq.t(), scale_a=gs, scale_b=wts.t(), out_dtype=torch.bfloat16)
        return y, dx

    xq, gq = quant_rows(x), quant_rows(dy)
    exact = x.float() @ w.float().t()
    error = float((fp8(*xq, *gq)[0].float() - exact).norm() / exact.norm())
    times = {
        "bf16": timed_ms(lambda: (x @ w.t(), dy @ w)),
        "fp8 GEMMs only": timed_ms(lambda: fp8(*xq, *gq)),
        "fp8 + eager casts": timed_ms(lambda: fp8(*quant_rows(x), *quant_rows(dy))),
        "fp8 + compiled casts": timed_ms(lambda: fp8(*compiled(x), *compiled(dy))),
    }
    return times, error


def probe(tokens: int, hidden: int, inter: int, kv: int) -> tuple[dict[str, float], float]:
    """Per-layer milliseconds of the base GEMMs, summed over the layer's seven linears, and
    the largest fp8 forward error among them."""
    compiled = torch.compile(quant_rows)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]
    total: dict[str, float] = {}
    worst = 0.0
    for k, n in shapes:
        times, error = linear_ms(tokens, k, n, compiled)
        worst = max(worst, error)
        for key, ms in times.items():
            total[key] = total.get(key, 0.0) + ms
    return total, worst


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name, (tokens, hidden, inter, kv, layers) in SHAPES.items():
        per_layer, error = probe(tokens, hidden, inter, kv)
        cells = ", ".join(f"{k} {v * layers:.1f} ms" for k, v in per_layer.items())
        print(
            f"{name}, base GEMMs of a step over {layers} layers: {cells}; "
            f"fp8 forward's relative error (largest over the linears) {error:.4f}"
        )


if __name__ == "__main__":
    main()
