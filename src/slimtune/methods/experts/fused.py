"""The dense expert path of training as one autograd function, on per-step compute copies.

The dense path (``layer.dense_lowrank``) runs every expert of a layer as one LoRA pair of
rank E * r and zeroes the unchosen experts' share with the gates. Written as plain ops under
autocast, each adapted linear costs a dozen kernels and as many autograd nodes forward and
again backward: the stacked ``A`` and ``B`` cast to bf16 (``B`` also permuted into a GEMM
layout) in every forward, the gate multiply, the add into the base output, the casts of
the gradients back. A GPU step was bound by that host work (profile: 262 ms of host time
against 109 ms of GPU time for the 1.24B shape, LoRA 117 against 102). Here, with ``G`` the
gates (scale included, 0 for the experts a token did not choose)::

    forward   y  = x W^T (+ b);   t = x A^T;   u = t * G;   y += u B^T   (in addmm's epilogue)
    backward  du = dy B;   dt = du * G;   dG = du * t
              dA = dt^T x;   dB = dy^T u;   dx = dy W + dt A

``A`` (E*r, in) and ``B`` (out, E*r) are bf16 copies made for every layer at once when a
weight changed (:class:`~..compute_copies.ComputeCopies`); the fp32 parameters stay the
optimizer's master weights and their gradients come out of the GEMMs in fp32. The gates'
gradient flows on to the router through autograd as before. Compiled layers (``--compile``)
keep the plain ops, which inductor fuses itself.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ...model.kernels import compute_dtype
from ..compute_copies import mm_to, step_copies
from .routing import ExpertRouter, Routing, expert_counts

FUSED = "_slimtune_experts_fused"  # the module's __dict__ key while fused_experts is entered


class DenseExpertsFunction(torch.autograd.Function):
    """``x W^T + b + ((x A^T) * G) B^T`` with the frozen base ``W``, ``b``; ``a``, ``b_p`` are
    the parameters (E, r, in) and (E, out, r), passed for their gradients; ``a_c``, ``b_c``
    their compute copies as (E*r, in) and (out, E*r); ``gates`` (N, E*r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b_p, a_c, b_c, gates):
        dtype = a_c.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        t = x2 @ a_c.t()
        u = t * gates
        y = torch.addmm(y, u, b_c.t())
        ctx.save_for_backward(x2, t, u, w, a_c, b_c, gates)
        ctx.meta = (x.shape, x.dtype, a.shape, a.dtype, b_p.shape, b_p.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, t, u, w, a_c, b_c, gates = ctx.saved_tensors
        x_shape, x_dtype, a_shape, a_dtype, b_shape, b_dtype = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        du = dy2 @ b_c  # (N, E*r)
        dt = du * gates
        grad_gates = du * t if ctx.needs_input_grad[7] else None
        grad_a = mm_to(dt.t(), x2, a_dtype).view(a_shape)
        e, out, r = b_shape
        # (out, E*r) -> the parameter's (E, out, r); autograd lays it out as the parameter
        grad_b = mm_to(dy2.t(), u, b_dtype).view(out, e, r).permute(1, 0, 2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(dy2 @ w, dt, a_c).reshape(x_shape).to(x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, grad_gates


def fused_forward(layer: nn.Module, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor | None:
    """The layer's dense training output through :class:`DenseExpertsFunction`, or None
    where it does not apply (outside :func:`fused_experts`, compiled, a base other than a
    plain frozen ``nn.Linear``)."""
    entry = layer.__dict__.get(FUSED)
    if entry is None or torch.compiler.is_compiling():
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    copies, index = entry
    a, b = layer.lora_A, layer.lora_B
    a_c, b_c = copies.get(index, a, b, 1.0, compute_dtype(x))
    b_c = b_c.reshape(b_c.shape[0], -1)  # (out, E, r) contiguous -> (out, E*r), a view
    return DenseExpertsFunction.apply(
        x, base.weight, base.bias, a, b, a_c, b_c, gates.to(a_c.dtype)
    )


@contextlib.contextmanager
def fused_experts(model: nn.Module, linears: Iterable[nn.Module]) -> Iterator[int]:
    """Within the block, the dense training path of ``model``'s expert layers ``linears``
    (``ExpertLinear``) runs :class:`DenseExpertsFunction` on compute copies, and their
    routers :class:`DenseRouteFunction`; yields how many linears take it."""
    layers: list[Any] = list(linears)
    routers = _dense_routers(layers)
    with step_copies(model) as copies:
        for m in layers:
            m.__dict__[FUSED] = (copies, copies.add(m.lora_A, m.lora_B, 1.0, _gemm_layout))
        for router, spec in routers.items():
            router.__dict__[FUSED] = spec
            router.route = types.MethodType(_fused_route, router)  # type: ignore[method-assign]
        try:
            yield len(layers)
        finally:
            for m in layers:
                m.__dict__.pop(FUSED, None)
            for router in routers:
                router.__dict__.pop(FUSED, None)
                router.__dict__.pop("route", None)


def _gemm_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' A (E, r, in) as (E*r, in) and B (E, out, r) as (out, E, r): views in
    the layout the dense GEMMs read (B's copy is then (out, E*r) without a copy)."""
    return a.flatten(0, 1), b.permute(1, 0, 2)


def _dense_routers(layers: list) -> dict[ExpertRouter, tuple[int, float]]:
    """The routers every one of whose linears trains densely, with one rank and scale
    (the dense gates they all read): {router: (rank, scaling)}."""
    found: dict[ExpertRouter, set] = {}
    for m in layers:
        dense = m.trains_densely(m.lora_A)  # the device the layer's input will be on
        found.setdefault(m.router, set()).add((m.lora_A.shape[1], m.scaling) if dense else None)
    return {r: next(iter(s)) for r, s in found.items() if len(s) == 1 and None not in s}


class DenseRouteFunction(torch.autograd.Function):
    """A layer's routing for the dense path as one function: the logits of the normalised,
    centred input, the top-k gates, the dense gate matrix the layer's linears read, and the
    balancing loss (``routing.ExpertRouter.route``, ``Routing.dense_gates`` and
    ``load_balancing_loss``, the same math)::

        logits = (x W^T) / rms(x) - W c;   top = topk(logits);   g = softmax(logits[top])
        G      = s * g at the chosen experts, 0 elsewhere (and on unrouted rows), each
                 repeated over the rank;   aux = E * sum_e f_e * mean(softmax(logits))_e

    As plain ops with autograd that was some 40 operators per layer forward and backward,
    as many as the layer's seven adapted linears took in the fused path. The gradient
    reaches ``W`` and ``x`` (through the logits and the rms) as before; the choice itself
    (``top``, the counts ``f``) has none, as before."""

    @staticmethod
    def forward(ctx, flat, weight, center, kept, rows, top_k, rank, scaling, dtype):
        d = flat.shape[1]
        experts = weight.shape[0]
        rms = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32).div_(d**0.5)
        inv_rms = (rms + 1e-6).reciprocal_()
        flat_c, weight_c = flat.to(dtype), weight.to(dtype)
        proj = mm_to(flat_c, weight_c.t(), torch.float32)  # (N, E), fp32 out of the GEMM
        logits = torch.addcmul(torch.mv(weight, center).neg_(), proj, inv_rms.unsqueeze(1))
        top_logits, top_i = logits.topk(top_k, dim=-1)
        gates = torch.softmax(top_logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        counts = expert_counts(top_i, experts)
        counts_f = counts.to(torch.float32)
        aux = torch.dot(counts_f, probs.mean(0)).mul_(experts / top_i.numel())
        g = torch.zeros_like(logits).scatter_(1, top_i, gates * scaling)
        if kept is not None:
            g = g.new_zeros(rows, experts).index_put_((kept,), g)
        # each expert's gate repeated over its rank: one cast and one copy
        dense = g.to(dtype).unsqueeze(2).expand(rows, experts, rank).reshape(rows, -1)
        ctx.save_for_backward(
            flat_c, weight_c, center, kept, rms, inv_rms, proj, top_i, gates, probs, counts_f
        )
        ctx.meta = (rank, scaling, top_i.numel(), weight.dtype)
        ctx.mark_non_differentiable(top_i, counts)
        ctx.set_materialize_grads(False)  # an output nobody used (aux at weight 0) costs nothing
        # ``gates`` is an output too (``Routing.weights``): a path that reads them (dense gates
        # of another key, the routed path) sends its gradient back through here as well
        return dense, aux, top_i, gates, counts

    @staticmethod
    def backward(ctx, d_dense, d_aux, _top, d_gates, _counts):
        saved = ctx.saved_tensors
        flat_c, weight_c, center, kept, rms, inv_rms, proj, top_i = saved[:8]
        gates, probs, counts_f = saved[8:]
        rank, scaling, slots, w_dtype = ctx.meta
        n, d = flat_c.shape
        experts = weight_c.shape[0]
        d_logits = torch.zeros_like(proj)
        d_top_gates = None if d_gates is None else d_gates.float()
        if d_dense is not None:  # dL/dg = s * (dL/dG summed over the rank) at the chosen
            dg = d_dense.reshape(d_dense.shape[0], experts, rank).sum(-1, dtype=torch.float32)
            if kept is not None:
                dg = dg.index_select(0, kept)
            dg = dg.gather(1, top_i).mul_(scaling)
            d_top_gates = dg if d_top_gates is None else dg.add_(d_top_gates)
        if d_top_gates is not None:  # the softmax of the top logits: p - g * sum(p)
            p = d_top_gates.mul_(gates)
            d_logits.scatter_(1, top_i, torch.addcmul(p, gates, p.sum(-1, keepdim=True), value=-1))
        if d_aux is not None:  # d aux / d probs[i, e] = aux' * E * f_e / N, f = counts / slots
            v = counts_f * (d_aux * (experts / (n * slots)))
            d_logits.addcmul_(probs, v - (probs @ v).unsqueeze(1))
        d_proj = d_logits * inv_rms.unsqueeze(1)  # (N, E) fp32
        grad_w = None
        if ctx.needs_input_grad[1]:  # logits = proj / rms - W c
            grad_w = mm_to(d_proj.to(flat_c.dtype).t(), flat_c, torch.float32)
            grad_w = grad_w.addr_(d_logits.sum(0), center, alpha=-1).to(w_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # through 1 / (rms + eps), rms = |x| / sqrt(d), d rms / dx = x / (rms d)
            coef = (d_logits * proj).sum(-1).mul_(inv_rms.square())
            coef = coef.div_((rms * d).clamp_min_(1e-30))
            grad_x = torch.addcmul(
                d_proj.to(flat_c.dtype) @ weight_c, flat_c, coef.unsqueeze(1).to(flat_c.dtype),
                value=-1,
            )  # fmt: skip
        return grad_x, grad_w, None, None, None, None, None, None, None


def _fused_route(router: ExpertRouter, hidden: torch.Tensor) -> Routing:
    """``ExpertRouter.route`` while :func:`fused_experts` is entered: through
    :class:`DenseRouteFunction` where the router trains for the dense path, else the
    router's own."""
    rank, scaling = router.__dict__[FUSED]
    if (
        not (router.training and torch.is_grad_enabled() and router.weight.requires_grad)
        or router.calibration is not None
        or torch.compiler.is_compiling()
    ):
        return type(router).route(router, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    kept = router._kept(hidden)
    if kept is not None:
        flat = flat.index_select(0, kept)
    dtype = compute_dtype(flat)
    dense, aux, top_i, gates, counts = DenseRouteFunction.apply(
        flat, router.weight, router.center, kept, hidden.shape[:-1].numel(), router.top_k,
        rank, scaling, dtype,
    )  # fmt: skip
    router.last_aux = aux
    router.usage += counts.to(router.usage.dtype)
    routing = Routing(top_i, gates, kept, router.experts)
    routing.fused_gates[(rank, scaling, dtype)] = dense
    return routing
