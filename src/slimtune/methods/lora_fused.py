"""LoRA under autocast with the update folded into the GEMMs (no separate scale and add).

peft computes ``y = base(x) + lora_B(lora_A(dropout(x))) * s`` as five kernels forward
(three GEMMs, a multiply, an add) and as many again backward, plus per-module Python work
that shows as launch gaps on a fast GPU. Here one autograd function computes the same sum
with the add inside cuBLAS's GEMM epilogue (``addmm``'s ``C + A @ B``), on compute-dtype
copies of the adapters made once per optimizer step for every layer
(:class:`~.compute_copies.ComputeCopies`,
``A_s = s * A``)::

    forward   y  = x W^T (+ b);   y += (x_d A_s^T) B^T          x_d = dropout(x), or x
    backward  g  = dy B;   dx = dy W;   dx += g A_s   (into dx_d's own tensor with dropout)
              dA = s * g^T x_d;   dB = dy^T (x_d A_s^T)

Without gradients (evaluation) the same GEMMs run without the autograd function (on a 4-bit
base bitsandbytes' own layer computes ``x W^T``, with its 4-bit GEMV for single tokens). It runs
only while :meth:`LoraMethod.compute_context` is entered (training and ``train``'s
evaluation under autocast) and only on what it covers: plain ``nn.Linear`` bases, and bitsandbytes' 4-bit ones
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
from .compute_copies import cast_now, mm_to, step_copies


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + (x_d A_s^T) B^T`` with the add in the GEMM epilogue, where ``A_s`` is
    the adapter's ``A`` times its scale in the compute dtype and ``B`` likewise (their
    compute copies, :class:`~.compute_copies.ComputeCopies`); the base ``W``, ``b`` are frozen (no
    gradient). ``a`` and ``b`` are the adapter's parameters, passed for their gradients."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        x_dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        a_scaled: torch.Tensor,
        b_c: torch.Tensor,
        scaling: float,
        quant_state: Any = None,
    ) -> torch.Tensor:
        y, xd, xa, w = _forward(x, x_dropped, weight, bias, a_scaled, b_c, quant_state)
        # a 4-bit weight is saved packed and dequantized again in backward
        ctx.save_for_backward(xd, xa, w if quant_state is None else weight, a_scaled, b_c)
        ctx.quant_state, ctx.dtype, ctx.scaling = quant_state, a_scaled.dtype, scaling
        ctx.shapes = (x.shape, x.dtype, a.dtype, b.dtype, x_dropped is not None)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xd, xa, w, a_s, b_c = ctx.saved_tensors
        w = _base_weight(w, ctx.quant_state, ctx.dtype)
        shape, x_dtype, a_dtype, b_dtype, dropped = ctx.shapes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        g = dy2 @ b_c  # (N, r)
        dx = dy2 @ w
        # xa already carries the scale (it is x_d A_s^T); A's gradient takes it once more
        grad_a = mm_to(g.t(), xd, a_dtype).mul_(ctx.scaling)
        grad_b = mm_to(dy2.t(), xa, b_dtype)
        copies_scale_state = (None,) * 4  # a_scaled, b_c, scaling, quant_state
        if dropped:  # the LoRA path's input gradient goes back through the dropout
            grad_xd = (g @ a_s).reshape(shape).to(x_dtype)
            dx_ = dx.reshape(shape).to(x_dtype)
            return dx_, grad_xd, None, None, grad_a, grad_b, *copies_scale_state
        dx = torch.addmm(dx, g, a_s)
        return dx.reshape(shape).to(x_dtype), None, None, None, grad_a, grad_b, *copies_scale_state


def _forward(x, x_dropped, weight, bias, a_scaled, b_c, quant_state):
    """The forward GEMMs in the compute copies' dtype (autocast's where it is on: every
    operand is already in it, so autocast casts nothing): the output and what backward
    keeps (x_d, x_d A_s^T, the base weight)."""
    dtype = a_scaled.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    xd = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1]).to(dtype)
    w = _base_weight(weight, quant_state, dtype)
    y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
    y, xa = _plus_adapter(y, xd, a_scaled, b_c)
    return y.reshape(*x.shape[:-1], w.shape[0]), xd, xa, w


def _plus_adapter(y: torch.Tensor, xd: torch.Tensor, a_scaled: torch.Tensor, b_c: torch.Tensor):
    """``y + (x_d A_s^T) B^T`` on 2-D operands in the copies' dtype, the add in the second
    GEMM's epilogue, and ``x_d A_s^T`` (what backward keeps)."""
    xa = xd @ a_scaled.t()
    return torch.addmm(y, xa, b_c.t()), xa


def _add_adapter(y: torch.Tensor, xd: torch.Tensor, a_scaled: torch.Tensor, b_c: torch.Tensor):
    """:func:`_plus_adapter` on a base layer's output of any leading shape."""
    dtype = a_scaled.dtype
    flat = (y.reshape(-1, y.shape[-1]).to(dtype), xd.reshape(-1, xd.shape[-1]).to(dtype))
    y2, _ = _plus_adapter(*flat, a_scaled, b_c)
    return y2.reshape(*y.shape[:-1], y2.shape[-1])


def _base_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``: a 4-bit one dequantized (a transient matrix)."""
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs):
    """peft ``lora.Linear.forward`` for the case it covers, else peft's own. With no
    gradient to record (evaluation, generation) the same GEMMs run without the autograd
    function."""
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
    x_dropped = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
    a, b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    if torch.compiler.is_compiling():  # read no per-layer state: one graph for all layers
        a_scaled, b_c = cast_now(a, b, scaling, compute_dtype(x))
    else:
        copies, index = self.__dict__["_slimtune_lora"]
        a_scaled, b_c = copies.get(index, a, b, scaling, compute_dtype(x))
    if not torch.is_grad_enabled():
        if quant_state is not None:  # bitsandbytes' own 4-bit kernels (a GEMV per token)
            return _add_adapter(base(x), x if x_dropped is None else x_dropped, a_scaled, b_c)
        return _forward(x, x_dropped, base.weight, base.bias, a_scaled, b_c, quant_state)[0]
    return LoraLinearFunction.apply(
        x, x_dropped, base.weight, base.bias, a, b, a_scaled, b_c, scaling, quant_state
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
    switched: list[Any] = [m for m in model.modules() if _covered(m, pairs)]  # peft's layers
    with step_copies(model) as copies:
        for m in switched:
            name = m.active_adapters[0] if len(m.active_adapters) == 1 else None
            index = -1
            if name is not None and name in m.lora_A:
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                index = copies.add(a, b, float(m.scaling[name]))
            # a bound method, not a partial per layer: torch.compile guards on the forward's
            # identity, and one object per layer compiled every layer apart
            m.__dict__["_slimtune_lora"] = (copies, index)
            m.forward = types.MethodType(_fused_forward, m)
        try:
            yield len(switched)
        finally:
            for m in switched:
                m.__dict__.pop("forward", None)
                m.__dict__.pop("_slimtune_lora", None)
