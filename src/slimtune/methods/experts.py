"""Routed expert adapters: per decoder layer, E small low-rank experts and a learned router;
each token runs only its top-k experts (conditional computation).

One adapted layer::

    p      = softmax(router(h / rms(h) - c))    h: the layer's input hidden state, per token;
                                                c: its mean on calibration batches
    top    = the k largest entries of p; gates g = p[top] / sum(p[top])
    y      = W x + (alpha / r) * sum_{e in top} g_e * B_e A_e x     for every adapted linear W

An expert is a LoRA pair (A_e: r x in, B_e: out x r) on each adapted linear of the layer, so
one routing decision per token and layer picks the same experts for q, k, v, ..., down.

What is dense and what is not:

* dense, every token: the base layer, and the router (E logits per token: d x E MACs);
* conditional, only the routed tokens: each token runs its k experts and no other.
  Adapter FLOPs per token are ``k * r * (in + out)`` per linear, whatever E is; an expert
  no token chose is not read at all (and gets no gradient).
* Padding tokens (``attention_mask == 0``) are not routed.

Implementations of the same sum:

* inference on CUDA: the fused Triton kernel in ``expert_kernel.py`` (tokens tiled by their
  set of k experts; one read and one write of each output row); on CPU (fp32) the fused C
  kernel in ``expert_cpu.py`` (the same, a token at a time);
* training, and anywhere the kernel does not run: the gathered path here. The token rows are
  gathered into groups, one per expert (``index_select``), each group runs through its A_e
  then B_e (one grouped GEMM per factor on CUDA SM90+, a loop over the experts that got
  tokens elsewhere), and each slot's gated result is added to its token's row of the base
  output (a deterministic accumulation).

Load balancing (Switch Transformer): ``aux = E * sum_e f_e * P_e`` with f_e the share of
routing slots given to expert e and P_e its mean router probability; 1 for perfectly even
routing, up to E when one expert takes everything. The trainer adds ``aux_weight * aux``
(averaged over layers) to the loss; only P_e carries gradient.

The routing cannot be folded into the base weights, so the delta says ``mergeable: false``
and applying it attaches these modules (``attach_experts``); removing them puts the original
``nn.Linear`` objects back, so the base is untouched bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import DeltaError, UserInputError
from ..fileio import write_safetensors
from ..models import decoder_layers
from . import expert_cpu, expert_kernel
from .base import SWEEP, Attachment, Method, MethodConfig, register_method
from .lora import target_module_names

EXPERTS_FILE = "experts.safetensors"


@dataclass
class ExpertsOptions(MethodConfig):
    experts: int = field(default=8, metadata=SWEEP)
    top_k: int = field(default=2, metadata=SWEEP)
    rank: int = field(default=8, metadata=SWEEP)
    alpha: float = 16.0
    aux_weight: float = 0.01  # load-balancing loss weight
    # Short names of the linear modules to adapt; None = every linear layer in the blocks.
    target_modules: list[str] | None = None
    calibration_batches: int = 4  # batches of training data that center the routers
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_batches < 0:
            raise UserInputError("calibration_batches must be >= 0")
        if self.experts < 1:
            raise UserInputError(f"experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise UserInputError(f"top_k must be between 1 and experts ({self.experts}), "
                                 f"got {self.top_k}")
        if self.rank < 1:
            raise UserInputError(f"expert rank must be >= 1, got {self.rank}")
        if self.aux_weight < 0:
            raise UserInputError(f"aux_weight must be >= 0, got {self.aux_weight}")


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` for router probabilities ``probs`` (N, E) and the chosen
    experts ``chosen`` (N, k). Minimal (1) when routing is uniform."""
    f = torch.bincount(chosen.reshape(-1), minlength=experts).to(probs.dtype) / chosen.numel()
    return experts * (f * probs.mean(0)).sum()


@dataclass
class Routing:
    """One layer's routing of one forward pass, shared by the layer's adapted linears.

    Kept per token (``chosen``, ``weights``); the layouts the adapters run on are derived
    once per layer on first use: slots grouped by expert (gathered path, training) or tiles
    of tokens sharing their expert set (fused kernel, inference on CUDA)."""

    chosen: torch.Tensor  # (N, k) experts of each routed token
    weights: torch.Tensor  # (N, k) their gates (renormalised top-k probabilities)
    kept: torch.Tensor | None  # (N,) flat row of each routed token; None = every row
    experts: int
    _slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _counts: list[int] | None = None
    _offsets: torch.Tensor | None = None
    _plan: expert_kernel.TilePlan | None = None
    _sets: ExpertSets | bool | None = None
    # gathered input rows per layout ("slots" / "sets"): (the input they came from, rows);
    # linears that share an input (q, k, v; gate, up) share one gather
    _gathered: dict = field(default_factory=dict)

    def _grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._slots is None:
            slots = self.chosen.reshape(-1)
            order = torch.argsort(slots, stable=True)
            tokens = order // self.chosen.shape[1]
            if self.kept is not None:
                tokens = self.kept[tokens]
            counts = torch.bincount(slots, minlength=self.experts)
            self._slots = (tokens, self.weights.reshape(-1)[order], counts)
        return self._slots

    @property
    def tokens(self) -> torch.Tensor:
        """(M,) flat token row of each routing slot, slots grouped by expert."""
        return self._grouped()[0]

    @property
    def gates(self) -> torch.Tensor:
        """(M,) each slot's gate, in the grouped order."""
        return self._grouped()[1]

    @property
    def counts_t(self) -> torch.Tensor:
        """(E,) slots per expert, on the device."""
        return self._grouped()[2]

    @property
    def counts(self) -> list[int]:
        """Slots per expert as host ints (one device sync, shared by the layer's linears)."""
        if self._counts is None:
            self._counts = self.counts_t.tolist()
        return self._counts

    def spans(self) -> list[tuple[int, int, int]]:
        """(expert, first slot, end slot) of every expert that got slots."""
        spans, start = [], 0
        for e, count in enumerate(self.counts):
            if count:
                spans.append((e, start, start + count))
                start += count
        return spans

    @property
    def offsets(self) -> torch.Tensor:
        """End of each expert's group of slots (int32, for the grouped GEMM)."""
        if self._offsets is None:
            self._offsets = torch.cumsum(self.counts_t, 0).to(torch.int32)
        return self._offsets

    def _gather(self, layout: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        hit = self._gathered.get(layout)
        if hit is None or hit[0] is not x:
            hit = (x, x.reshape(-1, x.shape[-1]).index_select(0, rows))
            self._gathered[layout] = hit
        return hit[1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The slots' input rows, grouped by expert."""
        return self._gather("slots", x, self.tokens)

    def plan(self) -> expert_kernel.TilePlan:
        """The fused kernel's tiles (tokens grouped by their set of k experts)."""
        if self._plan is None:
            self._plan = expert_kernel.plan_tiles(self.chosen, self.weights, self.kept,
                                                  self.experts)
        return self._plan

    def expert_sets(self, rank: int) -> ExpertSets | None:
        """Tokens grouped by their set of k experts, where that pays: k > 1 and the stacked
        weights of every possible set (C(E, k) x k*r rows) are small next to the tokens
        (on an H100 at 16k tokens: E=8 k=2 and k=4 gain, E=32 k=2 loses)."""
        if self._sets is None:
            self._sets = False
            n, k = self.chosen.shape
            if (k > 1 and n > expert_kernel.SMALL_BATCH
                    and 4 * math.comb(self.experts, k) * k * rank <= n):
                plan = self.plan()
                sets, keys = _all_sets(self.experts, k, plan.keys.device)
                # every possible set is a group (empty ones too): no host sync
                counts = torch.bincount(torch.searchsorted(keys, plan.keys),
                                        minlength=len(keys))
                self._sets = ExpertSets(plan.tokens, counts.cumsum(0).to(torch.int32), sets,
                                        plan.gates)
        return self._sets or None

    def gather_sets(self, x: torch.Tensor) -> torch.Tensor:
        """The routed input rows in expert-set order (each token once)."""
        return self._gather("sets", x, self._sets.tokens)


@functools.cache
def _all_sets(experts: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every set of k of the experts (ascending ids, in lexicographic order) and its key,
    the set as ``expert_kernel.plan_tiles`` keys it."""
    sets = torch.combinations(torch.arange(experts), k)
    return sets.to(device), expert_kernel.set_keys(sets, experts).to(device)


@dataclass
class ExpertSets:
    """The routed tokens grouped by their set of k experts, for a grouped GEMM whose groups
    are the sets, each with its k experts' factors stacked (k*r wide). Each token's row is
    gathered, run and added to the output once, where grouping by single expert handles it
    k times; the price is copying every set's factors, so it is used only where C(E, k) x
    k*r is at most a quarter of the tokens, and on CUDA (training, or inference without the
    fused kernel; see EXPERT_SET_DEVICES)."""

    tokens: torch.Tensor  # (N,) flat token rows, sorted by set
    offsets: torch.Tensor  # (G,) int32 end of each set's rows (G = every possible set)
    experts: torch.Tensor  # (G, k) each set's experts, ascending
    gates: torch.Tensor  # (N, k) float32 gates of the sorted rows, matching ``experts``


class ExpertRouter(nn.Module):
    """Chooses the top-k experts of each token from the layer's input hidden state."""

    def __init__(self, hidden_size: int, experts: int, top_k: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.experts, self.top_k = experts, top_k
        w = torch.randn(experts, hidden_size, generator=generator) / math.sqrt(hidden_size)
        self.weight = nn.Parameter(w)
        self.register_buffer("usage", torch.zeros(experts, dtype=torch.float64), persistent=False)
        # mean RMS-normalised input on calibration data; the router reads x/rms - center, so
        # the direction all hidden states share does not send every token to one expert
        self.register_buffer("center", torch.zeros(hidden_size), persistent=False)
        self.calibration: list | None = None  # [sum, count] while calibrating
        self.current: Routing | None = None
        self.token_mask: torch.Tensor | None = None  # (B, T) of the running forward, if known
        self.kept_cache: dict | None = None  # shared by the model's routers for one forward
        self._cached: tuple | None = None  # see _projection
        self.last_aux: torch.Tensor | None = None

    def _kept(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Flat rows of the non-padding tokens (None: all of them). One host sync per model
        forward: the layers share the answer through ``kept_cache``."""
        mask, n = self.token_mask, hidden.shape[1]
        if mask is None or mask.shape[0] != hidden.shape[0] or mask.shape[1] < n:
            return None
        cache = self.kept_cache if self.kept_cache is not None else {}
        if n not in cache:
            m = mask[:, -n:].reshape(-1).bool()
            cache[n] = None if bool(m.all()) else m.nonzero().squeeze(1)
        return cache[n]

    def _projection(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The router weight in the input's dtype and ``-W c`` (the centering as a bias);
        cached while neither changes, unless the weight is being trained."""
        w, c = self.weight, self.center
        if torch.is_grad_enabled() and w.requires_grad:
            return w.to(dtype), -(w.float() @ c)
        key = (w.data_ptr(), w._version, c.data_ptr(), c._version, dtype)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, w.detach().to(dtype), -(w.detach().float() @ c))
        return self._cached[1], self._cached[2]

    def route(self, hidden: torch.Tensor) -> Routing:
        flat = hidden.reshape(-1, hidden.shape[-1])
        kept = self._kept(hidden)
        if kept is not None:
            flat = flat.index_select(0, kept)
        # logits of the RMS-normalised state; the norm is applied after the (autocast) matmul
        rms = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32) / math.sqrt(
            flat.shape[-1])
        inv_rms = 1.0 / (rms.unsqueeze(1) + 1e-6)
        if self.calibration is not None:
            self.calibration[0] += (flat.float() * inv_rms).sum(0)
            self.calibration[1] += flat.shape[0]
        weight, bias = self._projection(flat.dtype)
        logits = torch.addcmul(bias, F.linear(flat, weight).float(), inv_rms)
        # the top-k probabilities renormalised = a softmax over the top-k logits
        top_logits, top_i = logits.topk(self.top_k, dim=-1)
        routing = Routing(top_i, torch.softmax(top_logits, dim=-1), kept, self.experts)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            probs = torch.softmax(logits, dim=-1)
            self.last_aux = load_balancing_loss(probs, top_i, self.experts)
        if self.training:
            self.usage += routing.counts_t.to(self.usage.dtype)
        return routing


# Use torch's grouped GEMM where it runs (CUDA SM90+); False forces the per-expert loop.
GROUPED_MM = True


def _grouped_ok(x: torch.Tensor, inference: bool = False) -> bool:
    """Whether torch's grouped GEMM (one call for all experts, no host sync) can run: on
    CUDA it takes bf16 on SM90+, so only where the layer computes in bf16 anyway; on CPU its
    forward runs (fp32/bf16/fp16) but its backward fails (torch 2.13), so inference only."""
    if not (GROUPED_MM and hasattr(F, "grouped_mm")):
        return False
    if not x.is_cuda:
        return inference and x.device.type == "cpu" and x.dtype in (
            torch.float32, torch.bfloat16, torch.float16)
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return bf16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def expert_lowrank(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor,
                   routing: Routing, inference: bool = False) -> torch.Tensor:
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


def add_expert_updates(flat_out: torch.Tensor, xs: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor, gates: torch.Tensor, routing: Routing) -> None:
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


def set_lowrank(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sets: ExpertSets,
                scaling: float) -> torch.Tensor:
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
    warnings.warn(f"the fused expert kernel failed ({type(error).__name__}: {error}); expert "
                  "adapters run the gathered path from now on", stacklevel=3)


class ExpertLinear(nn.Module):
    """A frozen ``nn.Linear`` plus E low-rank experts, run on the tokens routed to them."""

    def __init__(self, base_layer: nn.Linear, router: ExpertRouter, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.router.current
        if routing is None:
            raise RuntimeError("ExpertLinear ran outside its decoder layer's forward "
                               "(no routing for this pass)")
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        flat_out = out.view(-1, out.shape[-1])
        inference = not (torch.is_grad_enabled()
                         and (x.requires_grad or a.requires_grad or b.requires_grad))
        if inference and FUSED_KERNEL:
            k = routing.chosen.shape[1]
            kernel = (expert_kernel if expert_kernel.supports(x, out, a, routing.experts, k)
                      else expert_cpu if expert_cpu.supports(x, out, a, k) else None)
            if kernel is not None:
                try:
                    kernel.add_routed_lowrank(x.reshape(-1, x.shape[-1]), flat_out, a, b,
                                              routing.plan(), self.scaling)
                    return out
                except Exception as e:  # fails before it writes: out is untouched
                    _disable_fused_kernel(e)
        sets = (routing.expert_sets(a.shape[1])
                if x.device.type in EXPERT_SET_DEVICES and _grouped_ok(x, inference) else None)
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
        if router.current is not None:  # the gathered inputs live on only in autograd
            router.current._gathered.clear()

    return hook


def _mask_hook(routers: list[ExpertRouter]):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache: dict = {}
        for r in routers:
            r.token_mask, r.kept_cache = mask, cache

    return hook


@dataclass
class Attached:
    routers: dict[int, ExpertRouter]
    linears: dict[str, ExpertLinear]  # "layer.module path" -> adapter
    _undo: list

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def attach_experts(model: nn.Module, layers: list[int], cfg: ExpertsOptions) -> Attached:
    """Give each layer in ``layers`` a router and wrap its target linears in experts."""
    targets = target_module_names(model, cfg.target_modules, "experts")
    gen = torch.Generator().manual_seed(cfg.seed)
    blocks = decoder_layers(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    routers: dict[int, ExpertRouter] = {}
    linears: dict[str, ExpertLinear] = {}
    undo: list = []
    for i in layers:
        block = blocks[i]
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)
                 and n.rsplit(".", 1)[-1] in targets]
        dev = next(block.parameters()).device
        size = hidden or block.get_submodule(names[0]).in_features
        router = ExpertRouter(size, cfg.experts, cfg.top_k, gen).to(dev)
        block.add_module("expert_router", router)
        routers[i] = router
        for name in names:
            base = block.get_submodule(name)
            adapter = ExpertLinear(base, router, cfg.rank, cfg.alpha, gen)
            _set_child(block, name, adapter)
            linears[f"{i}.{name}"] = adapter
            undo.append(lambda b=block, n=name, m=base: _set_child(b, n, m))
        handle = block.register_forward_pre_hook(_route_hook(router), with_kwargs=True)
        undo.append(handle.remove)
        undo.append(block.register_forward_hook(_release_hook(router)).remove)
        undo.append(lambda b=block: delattr(b, "expert_router"))
    handle = model.register_forward_pre_hook(_mask_hook(list(routers.values())), with_kwargs=True)
    undo.append(handle.remove)
    model._slimtune_experts = Attached(routers, linears, undo)
    undo.append(lambda: model.__dict__.pop("_slimtune_experts", None))
    return model._slimtune_experts


def attached(model: nn.Module) -> Attached:
    found = model.__dict__.get("_slimtune_experts")
    if found is None:
        raise UserInputError("this model has no expert adapters attached")
    return found


def expert_usage(model: nn.Module) -> dict[int, list[float]]:
    """Per adapted layer, how many routing slots each expert took (since attaching)."""
    return {i: r.usage.tolist() for i, r in attached(model).routers.items()}


def adapter_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total adapter parameters, and those one token actually runs (its k experts + routers)."""
    att = attached(model)
    total = active = 0
    for r in att.routers.values():
        total += r.weight.numel()
        active += r.weight.numel()
    for lin in att.linears.values():
        n = lin.lora_A.numel() + lin.lora_B.numel()
        total += n
        active += n * lin.router.top_k // lin.router.experts
    return {"adapter_params": total, "active_params_per_token": active}


def _delta_tensors(att: Attached) -> dict[str, torch.Tensor]:
    """The live tensors an experts delta holds, by their name in ``experts.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    for i, r in att.routers.items():
        tensors[f"layers.{i}.router"] = r.weight
        tensors[f"layers.{i}.usage"] = r.usage
        tensors[f"layers.{i}.center"] = r.center
    for key, lin in att.linears.items():
        i, name = key.split(".", 1)
        tensors[f"layers.{i}.{name}.lora_A"] = lin.lora_A
        tensors[f"layers.{i}.{name}.lora_B"] = lin.lora_B
    return tensors


def save_experts(model: nn.Module, path: Path) -> None:
    """fp32 on disk; the usage counts stay fp64."""
    write_safetensors(path, {k: v.detach() if v.dtype == torch.float64 else v.detach().float()
                             for k, v in _delta_tensors(attached(model)).items()})


def load_experts(model: nn.Module, folder: Path, manifest: dict) -> Attached:
    """Attach the experts delta in ``folder`` as modules (it cannot merge); exact tensors."""
    try:
        cfg = ExpertsOptions.from_dict(manifest["method_config"], f"{folder}: method_config")
    except (UserInputError, TypeError) as e:
        raise DeltaError(f"{folder}: {e}") from e
    layers = list(manifest["layers"])
    n = len(decoder_layers(model))
    if any(not 0 <= i < n for i in layers):
        raise DeltaError(f"{folder}: layers {layers} do not fit a model of {n} layers")
    try:
        tensors = load_file(str(folder / EXPERTS_FILE))
    except Exception as e:
        raise DeltaError(f"{folder / EXPERTS_FILE}: unreadable ({e})") from e
    att = attach_experts(model, layers, cfg)
    try:
        expected = _delta_tensors(att)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise DeltaError(f"{folder / EXPERTS_FILE}: tensors do not match the manifest "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for key, target in expected.items():
                value = tensors[key]
                if value.shape != target.shape:
                    raise DeltaError(f"{folder / EXPERTS_FILE}: {key} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value)
    except DeltaError:
        att.remove()
        raise
    for r in att.routers.values():
        r.weight.requires_grad_(False)
    for lin in att.linears.values():  # serve in the base's dtype (bf16 on GPU): no cast per pass
        dtype = lin.base_layer.weight.dtype
        lin.lora_A.data = lin.lora_A.data.to(dtype)
        lin.lora_B.data = lin.lora_B.data.to(dtype)
        lin.lora_A.requires_grad_(False)
        lin.lora_B.requires_grad_(False)
    return att


def center_routers(model: nn.Module, att: Attached, batches: list[dict]) -> None:
    """Set each router's ``center`` to the mean normalised input of its layer on
    ``batches`` (forward passes without gradients; padding excluded)."""
    was_training = model.training
    model.eval()
    routers = list(att.routers.values())
    for r in routers:
        r.calibration = [torch.zeros_like(r.center, dtype=torch.float32), 0]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      use_cache=False)
        for r in routers:
            total, count = r.calibration
            if count:
                r.center.copy_(total / count)
    finally:
        for r in routers:
            r.calibration = None
        model.train(was_training)


@register_method
class ExpertsMethod(Method):
    name = "experts"
    config_class = ExpertsOptions
    mergeable = False
    why_not_mergeable = "its experts are routed per token"
    default_lr = 5e-4
    delta_files = (EXPERTS_FILE,)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._aux_seen: list[float] = []

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        if not layers:
            raise UserInputError("experts: no layer left to adapt (everything is frozen)")
        model.requires_grad_(False)
        att = attach_experts(model, layers, self.config)
        if batches is not None and self.config.calibration_batches > 0:
            center_routers(model, att, batches(self.config.calibration_batches))
        return model

    def auxiliary_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``aux_weight`` x the load-balancing loss of the last forward, averaged over layers."""
        routers = attached(model).routers.values()
        values = [r.last_aux for r in routers if r.last_aux is not None]
        for r in routers:
            r.last_aux = None
        if not values or self.config.aux_weight == 0:
            return None
        aux = torch.stack(values).mean()
        self._aux_seen.append(float(aux.detach()))
        return self.config.aux_weight * aux

    def step_metrics(self, model: nn.Module) -> dict:
        seen, self._aux_seen = self._aux_seen, []
        return {"balance_loss": sum(seen) / len(seen)} if seen else {}

    def extra_state(self, model: nn.Module) -> dict:
        return {name: buf for name, buf in model.named_buffers()
                if name.endswith(("expert_router.usage", "expert_router.center"))}

    def summary(self, model: nn.Module) -> dict:
        return {**adapter_parameter_counts(model),
                "expert_usage": {str(k): v for k, v in expert_usage(model).items()}}

    def save(self, model: nn.Module, folder: Path) -> None:
        save_experts(model, folder / EXPERTS_FILE)

    @classmethod
    def attach(cls, model: nn.Module, folder: Path, manifest: dict, *,
               merge: bool) -> Attachment:
        """Attach the experts as modules (never merged); undo puts the original layers back."""
        return Attachment(model, False, load_experts(model, folder, manifest).remove)


__all__ = ["EXPERTS_FILE", "ExpertLinear", "ExpertRouter", "ExpertsMethod", "ExpertsOptions",
           "adapter_parameter_counts", "attach_experts", "expert_usage",
           "load_balancing_loss", "load_experts"]
