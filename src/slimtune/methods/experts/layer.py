"""An expert-adapted linear layer and the ways to compute its routed low-rank sum.

Training and any device without a fused kernel run the gathered path here; inference runs
the fused kernels (``cuda_kernel.py``, ``cpu_kernel.py``) where they apply.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...model.kernels import compute_dtype
from . import cpu_kernel, cuda_kernel
from .fused import fused_forward
from .routing import ExpertRouter, ExpertSets, Routing, kept_rows

# Use torch's grouped GEMM where it runs (CUDA SM90+); False forces the per-expert loop.
GROUPED_MM = True

DISPATCH = ("auto", "dense", "routed")
# The widest E * r that ``auto`` trains densely on CUDA: up to here a GEMM of that width costs
# about one read of x (memory-bound on an H100/H200), less than routing's gathers and scatters.
DENSE_MAX_WIDTH = 256


def dense_lowrank(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """``sum_e g_e * B_e A_e x`` over *every* expert, ``gates`` (N, E * r) zero where a row did
    not choose the expert: two plain GEMMs of width E * r, no gathers (see method.py for when
    this beats routing). ``x`` is (N, in); differentiable in all four."""
    e, r, d_in = a.shape
    t = F.linear(x, a.reshape(e * r, d_in))
    t = t * gates.to(t.dtype)
    return F.linear(t, b.permute(1, 0, 2).reshape(b.shape[1], e * r))


def _grouped_ok(x: torch.Tensor, inference: bool = False) -> bool:
    """Whether torch's grouped GEMM (one call for all experts, no host sync) can run: on
    CUDA it takes bf16 on SM90+, so only where the layer computes in bf16 anyway; on CPU its
    forward runs (fp32/bf16/fp16) but its backward fails (torch 2.13), so inference only."""
    if not (GROUPED_MM and hasattr(F, "grouped_mm")):
        return False
    if not x.is_cuda:
        return (
            inference
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        )
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    return bf16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def expert_lowrank(
    xs: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gates: torch.Tensor,
    routing: Routing,
    inference: bool = False,
) -> torch.Tensor:
    """``g * B_e A_e x`` for every slot, the slots grouped by expert (rows of ``xs``).

    The autograd path (training; also inference where neither the fused kernel nor an
    in-place loop applies). Only the rows routed to expert e meet A_e and B_e: on CUDA
    (SM90+, bf16) as one grouped GEMM per factor, elsewhere as a loop over the experts that
    received tokens. The gate scales the rank-r intermediate, which is cheaper than scaling
    the output and the same.
    """
    global GROUPED_MM
    if _grouped_ok(xs, inference):
        dtype = torch.bfloat16 if xs.is_cuda else xs.dtype
        try:
            t = F.grouped_mm(xs.to(dtype), a.to(dtype).transpose(1, 2), offs=routing.offsets)
            t = t * gates.to(t.dtype).unsqueeze(1)
            return F.grouped_mm(t, b.to(dtype).transpose(1, 2), offs=routing.offsets)
        except RuntimeError as e:  # a shape or build the kernel does not take: loop instead
            GROUPED_MM = False
            warnings.warn(f"grouped GEMM unavailable ({e}); experts run in a loop", stacklevel=2)
    spans = routing.spans()
    if not spans:
        return xs.new_zeros(0, b.shape[1])
    t = torch.cat([F.linear(xs[s:f], a[e]) for e, s, f in spans])
    t = t * gates.to(t.dtype).unsqueeze(1)
    return torch.cat([F.linear(t[s:f], b[e]) for e, s, f in spans])


def add_expert_updates(
    flat_out: torch.Tensor,
    xs: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gates: torch.Tensor,
    routing: Routing,
) -> None:
    """Inference without the fused kernel or a grouped GEMM: expert by expert, its rows'
    update is added to the output right after it is computed, so it is still in cache
    (rather than one buffer of k output rows per token written first and read back)."""
    a, b = a.to(xs.dtype), b.to(xs.dtype)
    t = xs.new_empty(xs.shape[0], a.shape[1])
    spans = routing.spans()
    for e, s, f in spans:
        torch.mm(xs[s:f], a[e].t(), out=t[s:f])
    t.mul_(gates.to(t.dtype).unsqueeze(1))
    for e, s, f in spans:
        flat_out.index_add_(0, routing.tokens[s:f], torch.mm(t[s:f], b[e].t()).to(flat_out.dtype))


def set_lowrank(
    xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sets: ExpertSets, scaling: float
) -> torch.Tensor:
    """``g * B_e A_e x`` summed over each row's k experts, the rows grouped by expert set:
    one grouped GEMM per factor with each set's k experts stacked into a k*r-wide LoRA pair
    (differentiable: gradients reach the chosen experts and, through the gates, the router)."""
    dtype = torch.bfloat16 if xs.is_cuda else xs.dtype
    g, k = sets.experts.shape
    r = a.shape[1]
    a_sets = a[sets.experts].reshape(g, k * r, a.shape[2])  # rows j*r + i: expert j, rank i
    b_sets = b[sets.experts].permute(0, 2, 1, 3).reshape(g, b.shape[1], k * r)
    gates = (sets.gates * scaling).repeat_interleave(r, dim=1)
    t = F.grouped_mm(xs.to(dtype), a_sets.to(dtype).transpose(1, 2), offs=sets.offsets)
    t = t * gates.to(t.dtype)
    return F.grouped_mm(t, b_sets.to(dtype).transpose(1, 2), offs=sets.offsets)


# Devices where the grouped GEMM groups tokens by expert set where that pays (ExpertSets);
# elsewhere it groups by single expert. Not the CPU: its grouped GEMM loops over the groups,
# and many small groups (C(E, k) sets) cost more there than the traffic they save.
EXPERT_SET_DEVICES = {"cuda"}

# Run inference through a fused kernel where one runs (Triton on CUDA, C on CPU in fp32);
# False = the grouped paths. SLIMTUNE_FUSED_EXPERTS=0 turns them off; a kernel that fails
# turns them off too.
FUSED_KERNEL = os.environ.get("SLIMTUNE_FUSED_EXPERTS", "1") != "0"


def _add_rows(flat_out: torch.Tensor, rows: torch.Tensor, h: torch.Tensor) -> None:
    """``flat_out[rows] += h`` with repeated rows summed in a deterministic order: index_add_
    is sequential on CPU; on CUDA it would use atomics, index_put_ sorts instead."""
    if flat_out.is_cuda:
        flat_out.index_put_((rows,), h, accumulate=True)
    else:
        flat_out.index_add_(0, rows, h)


def _disable_fused_kernel(error: Exception) -> None:
    global FUSED_KERNEL
    FUSED_KERNEL = False
    warnings.warn(
        f"the fused expert kernel failed ({type(error).__name__}: {error}); expert "
        "adapters run the gathered path from now on",
        stacklevel=3,
    )


class ExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` plus E low-rank experts, run on the tokens routed to them."""

    def __init__(
        self,
        base_layer: nn.Linear,
        router: ExpertRouter,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        dispatch: str = "auto",
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        self.dispatch = dispatch
        self.base_layer = base_layer
        self._router = [router]  # a reference, not a submodule: the layer owns the router
        e, dev = router.experts, base_layer.weight.device
        a = torch.empty(e, rank, base_layer.in_features)
        for i in range(e):  # peft's LoRA init per expert: A ~ kaiming-uniform, B = 0
            bound = 1 / math.sqrt(base_layer.in_features)
            a[i].uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(e, base_layer.out_features, rank, device=dev))
        self.scaling = alpha / rank

    @property
    def router(self) -> ExpertRouter:
        return self._router[0]

    def trains_densely(self, x: torch.Tensor) -> bool:
        """Whether training runs every expert, masked (``dense_lowrank``), rather than routed."""
        if self.dispatch != "auto":
            return self.dispatch == "dense"
        return x.is_cuda and self.lora_A.shape[0] * self.lora_A.shape[1] <= DENSE_MAX_WIDTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router.current
        if routing is None:
            raise RuntimeError(
                "ExpertLinear ran outside its decoder layer's forward (no routing for this pass)"
            )
        a: torch.Tensor = self.lora_A
        b: torch.Tensor = self.lora_B
        if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        inference = not (
            torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)
        )
        if not inference and self.trains_densely(x):
            rows = x.numel() // x.shape[-1]
            gates = routing.dense_gates(rows, a.shape[1], self.scaling, compute_dtype(x))
            fused = fused_forward(self, x, gates)  # under the method's compute context
            if fused is not None:
                return fused
            out = self.base_layer(x)
            h = dense_lowrank(x.reshape(-1, x.shape[-1]), a, b, gates)
            # out of place: an in-place add into a view of ``out`` costs autograd a copy
            return out + h.view(out.shape).to(out.dtype)
        if torch.compiler.is_compiling():
            # The routed paths index and add rows by data-dependent counts, which
            # torch.compile cannot trace (--compile): they run eagerly between the compiled
            # parts of the layer, the base linear too (its output is added into in place,
            # which autograd forbids on the output of a compiled graph).
            return torch.compiler.disable(self._routed)(x, a, b, routing, inference)
        return self._routed(x, a, b, routing, inference)

    def _routed(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        routing,
        inference: bool,
    ) -> torch.Tensor:
        out = self.base_layer(x)
        flat_out = out.view(-1, out.shape[-1])
        if inference and FUSED_KERNEL:
            k = routing.chosen.shape[1]
            kernel = (
                cuda_kernel
                if cuda_kernel.supports(x, out, a, routing.experts, k)
                else cpu_kernel
                if cpu_kernel.supports(x, out, a, k)
                else None
            )
            if kernel is not None:
                try:
                    kernel.add_routed_lowrank(
                        x.reshape(-1, x.shape[-1]), flat_out, a, b, routing.plan(), self.scaling
                    )
                    return out
                except Exception as e:  # fails before it writes: out is untouched
                    _disable_fused_kernel(e)
        sets = (
            routing.expert_sets(a.shape[1])
            if x.device.type in EXPERT_SET_DEVICES and _grouped_ok(x, inference)
            else None
        )
        if sets is not None:
            h = set_lowrank(routing.gather_sets(x), a, b, sets, self.scaling).to(out.dtype)
            _add_rows(flat_out, sets.tokens, h)
            return out
        gates = routing.gates * self.scaling
        if inference and not _grouped_ok(x, inference):
            add_expert_updates(flat_out, routing.gather(x), a, b, gates, routing)
            return out
        h = expert_lowrank(routing.gather(x), a, b, gates, routing, inference).to(out.dtype)
        _add_rows(flat_out, routing.tokens, h)
        return out


def _route_hook(router: ExpertRouter):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        router.current = router.route(hidden)

    return hook


def _release_hook(router: ExpertRouter):
    def hook(module, args, output):
        if router.current is not None:  # gathered inputs and gates live on only in autograd
            router.current._gathered.clear()
            router.current._dense.clear()

    return hook


def _mask_hook(routers: list[ExpertRouter]):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        # the rows of a whole sequence (training, a prompt), found once for every layer;
        # decoding with a cache (a mask longer than the input) reads the mask's tail
        tokens = args[0] if args else kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        known = isinstance(tokens, torch.Tensor) and tokens.dim() >= 2
        rows = None
        if mask is not None and (not known or tokens.shape[1] == mask.shape[1]):
            rows = kept_rows(mask)
        cache: dict = {}
        for r in routers:
            r.token_mask, r.kept_rows, r.kept_cache = mask, rows, cache

    return hook
