"""LoRA's training step with the update folded into the GEMMs (no separate scale and add).

peft computes ``y = base(x) + lora_B(lora_A(dropout(x))) * s`` as five kernels forward
(three GEMMs, a multiply, an add) and as many again backward, plus per-module Python work
that shows as launch gaps on a fast GPU. Here one autograd function computes the same sum
with the scale and the add inside cuBLAS's GEMM epilogue (``addmm``'s ``beta * C + alpha *
A @ B``)::

    forward   y  = x W^T (+ b);   y += s * (x_d A^T) B^T        x_d = dropout(x), or x
    backward  g  = dy B;   dx = dy W;   dx += s * g A   (into dx_d's own tensor with dropout)
              dA = s * g^T x_d;   dB = s * dy^T (x_d A^T)

It runs only while :meth:`LoraMethod.compute_context` is entered (training under autocast)
and only on what it covers: plain ``nn.Linear`` bases, and bitsandbytes' 4-bit ones
(``--quantize nf4``), with one active, unmerged, vanilla LoRA adapter; anything else takes
peft's own forward. A 4-bit ``W`` is dequantized for the forward GEMM and again in backward
(as bitsandbytes' own matmul does), never kept: keeping it would hold the base at 16 bits.
That also skips the copy of the base output peft's 4-bit layer makes before adding LoRA. The adapter weights stay peft's
(fp32 master copies), so the delta, its format and inference are unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..model.kernels import compute_dtype


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x_d A^T) B^T`` with the scale and add in the GEMM epilogue; the
    base ``W``, ``b`` are frozen (no gradient)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        x_dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        quant_state: Any = None,
    ) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            xd = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1]).to(dtype)
            w, a_, b_ = _base_weight(weight, quant_state, dtype), a.to(dtype), b.to(dtype)
            y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            xa = xd @ a_.t()
            y = torch.addmm(y, xa, b_.t(), alpha=scaling)
        # a 4-bit weight is saved packed and dequantized again in backward
        ctx.save_for_backward(xd, xa, w if quant_state is None else weight, a_, b_)
        ctx.quant_state, ctx.dtype = quant_state, dtype
        ctx.scaling = scaling
        ctx.shapes = (x.shape, x.dtype, a.dtype, b.dtype, x_dropped is not None)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xd, xa, w, a_, b_ = ctx.saved_tensors
        w = _base_weight(w, ctx.quant_state, ctx.dtype)
        shape, x_dtype, a_dtype, b_dtype, dropped = ctx.shapes
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        g = dy2 @ b_  # (N, r)
        dx = dy2 @ w
        grad_a = (g.t() @ xd).mul_(s).to(a_dtype)
        grad_b = (dy2.t() @ xa).mul_(s).to(b_dtype)
        if dropped:  # the LoRA path's input gradient goes back through the dropout
            grad_xd = (g @ a_).mul_(s).reshape(shape).to(x_dtype)
            return dx.reshape(shape).to(x_dtype), grad_xd, None, None, grad_a, grad_b, None, None
        dx = torch.addmm(dx, g, a_, alpha=s)
        return dx.reshape(shape).to(x_dtype), None, None, None, grad_a, grad_b, None, None


def _base_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``: a 4-bit one dequantized (a transient matrix)."""
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft ``lora.Linear.forward`` for the case it covers, else peft's own."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or name is None
        or name not in self.lora_A
        or name in getattr(self, "lora_variant", {})  # DoRA and other variants
        or getattr(self.lora_B[name], "bias", None) is not None
    ):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return type(self).forward(self, x, *args, **kwargs)
    quant_state = getattr(base.weight, "quant_state", None)  # a 4-bit base (Params4bit)
    dropout = self.lora_dropout[name]
    x_dropped = None if isinstance(dropout, nn.Identity) else dropout(x)
    return LoraLinearFunction.apply(
        x,
        x_dropped,
        base.weight,
        base.bias,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        quant_state,
    )


def _covered_types() -> list[tuple[type, type]]:
    """(peft's LoRA layer, its base layer) pairs the fused function computes."""
    from peft.tuners.lora import Linear as LoraLinear

    pairs: list[tuple[type, type]] = [(LoraLinear, nn.Linear)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb

        if hasattr(peft_bnb, "Linear4bit"):
            pairs.append((peft_bnb.Linear4bit, bnb.nn.Linear4bit))
    return pairs


def _covered(module: nn.Module, pairs: list[tuple[type, type]]) -> bool:
    base = getattr(module, "base_layer", None)
    return (
        (type(module), type(base)) in pairs
        and "forward" not in module.__dict__
        # a base with a forward of its own (RoSA's sparse delta) keeps peft's path
        and "forward" not in base.__dict__
    )


@contextlib.contextmanager
def fused_lora(model: nn.Module) -> Iterator[int]:
    """Within the block, peft's LoRA linears of ``model`` run :class:`LoraLinearFunction`;
    yields how many modules were switched. Leaving the block restores peft's forward."""
    pairs = _covered_types()
    switched = [m for m in model.modules() if _covered(m, pairs)]
    for m in switched:
        m.forward = types.MethodType(_fused_forward, m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.__dict__.pop("forward", None)
