"""The router of an expert layer: which k experts each token runs, with what gates.

See ``method.py`` for the math of the whole adapter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_kernel


def expert_counts(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """(E,) int64: how many of ``chosen``'s slots each expert got. A scatter into E counters,
    not ``bincount``, whose output size depends on the data (torch.compile cannot trace it)."""
    flat = chosen.reshape(-1)
    counts = torch.zeros(experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` for router probabilities ``probs`` (N, E) and the chosen
    experts ``chosen`` (N, k). Minimal (1) when routing is uniform."""
    f = expert_counts(chosen, experts).to(probs.dtype) / chosen.numel()
    return experts * (f * probs.mean(0)).sum()


def kept_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Flat rows of a (B, T) attention mask's tokens; None when it keeps every one."""
    m = mask.reshape(-1).bool()
    return None if bool(m.all()) else m.nonzero().squeeze(1)


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
    _plan: cuda_kernel.TilePlan | None = None
    _sets: ExpertSets | Literal[False] | None = None  # False: grouping by sets does not pay
    # gathered input rows per layout ("slots" / "sets"): (the input they came from, rows);
    # linears that share an input (q, k, v; gate, up) share one gather
    _gathered: dict = field(default_factory=dict)
    _dense: dict = field(default_factory=dict)  # (rank, scaling, dtype) -> dense gates
    # the same, made by the fused router (experts/fused.py) in its hook: kept after the
    # layer's forward, as a checkpointed layer's recompute (no hooks) must read them again
    fused_gates: dict = field(default_factory=dict)

    def _grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._slots is None:
            slots = self.chosen.reshape(-1)
            order = torch.argsort(slots, stable=True)
            tokens = order // self.chosen.shape[1]
            if self.kept is not None:
                tokens = self.kept[tokens]
            counts = expert_counts(slots, self.experts)
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

    def dense_gates(self, rows: int, rank: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """(rows, E * r) ``scaling * gate`` of each row's chosen experts, repeated over their
        rank, 0 for the experts it did not choose and for unrouted (padding) rows: the mask
        of the dense path, in the matmuls' dtype (cast once per layer, not per linear).
        Differentiable in the gates, so the router still learns."""
        # rows are the routing's own (one forward's): not part of the key, which under
        # torch.compile would make the length a constant of the graph
        key = (rank, scaling, dtype)
        if key in self.fused_gates:
            return self.fused_gates[key]
        if key not in self._dense:
            g = self.weights.new_zeros(self.weights.shape[0], self.experts)
            g = g.scatter(1, self.chosen, self.weights * scaling)
            if self.kept is not None:
                g = g.new_zeros(rows, self.experts).index_put((self.kept,), g)
            self._dense[key] = g.repeat_interleave(rank, dim=1).to(dtype)
        return self._dense[key]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The slots' input rows, grouped by expert."""
        return self._gather("slots", x, self.tokens)

    def plan(self) -> cuda_kernel.TilePlan:
        """The fused kernel's tiles (tokens grouped by their set of k experts)."""
        if self._plan is None:
            self._plan = cuda_kernel.plan_tiles(self.chosen, self.weights, self.kept, self.experts)
        return self._plan

    def expert_sets(self, rank: int) -> ExpertSets | None:
        """Tokens grouped by their set of k experts, where that pays: k > 1 and the stacked
        weights of every possible set (C(E, k) x k*r rows) are small next to the tokens
        (on an H100 at 16k tokens: E=8 k=2 and k=4 gain, E=32 k=2 loses)."""
        if self._sets is None:
            self._sets = False
            n, k = self.chosen.shape
            if (
                k > 1
                and n > cuda_kernel.SMALL_BATCH
                and 4 * math.comb(self.experts, k) * k * rank <= n
            ):
                plan = self.plan()
                sets, keys = _all_sets(self.experts, k, plan.keys.device)
                # every possible set is a group (empty ones too): no host sync
                counts = torch.bincount(torch.searchsorted(keys, plan.keys), minlength=len(keys))
                self._sets = ExpertSets(
                    plan.tokens, counts.cumsum(0).to(torch.int32), sets, plan.gates
                )
        return self._sets or None

    def gather_sets(self, x: torch.Tensor) -> torch.Tensor:
        """The routed input rows in expert-set order (each token once)."""
        assert self._sets, "gather_sets runs only where expert_sets returned the sets"
        return self._gather("sets", x, self._sets.tokens)


@functools.cache
def _all_sets(experts: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every set of k of the experts (ascending ids, in lexicographic order) and its key,
    the set as ``cuda_kernel.plan_tiles`` keys it."""
    sets = torch.combinations(torch.arange(experts), k)
    return sets.to(device), cuda_kernel.set_keys(sets, experts).to(device)


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

    usage: torch.Tensor  # buffers, registered in __init__
    center: torch.Tensor

    def __init__(
        self, hidden_size: int, experts: int, top_k: int, generator: torch.Generator | None = None
    ) -> None:
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
        self.kept_rows: torch.Tensor | None = None  # _kept of the whole token_mask
        self.kept_cache: dict | None = None  # shared by the model's routers for one forward
        self._cached: tuple | None = None  # see _projection
        self.last_aux: torch.Tensor | None = None

    def _kept(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Flat rows of the non-padding tokens (None: all of them). For a whole sequence
        (training, a prompt) the model's forward found them once for every layer
        (``kept_rows``: one host sync, outside the compiled layers of ``--compile``);
        decoding with a cache reads the mask's last ``n`` positions."""
        mask, n = self.token_mask, hidden.shape[1]
        if mask is None or mask.shape[0] != hidden.shape[0] or mask.shape[1] < n:
            return None
        if mask.shape[1] == n:
            return self.kept_rows
        if torch.compiler.is_compiling():  # keyed by the length: traced, it would
            return torch.compiler.disable(self._kept_tail)(mask, n)  # recompile per length
        return self._kept_tail(mask, n)

    def _kept_tail(self, mask: torch.Tensor, n: int) -> torch.Tensor | None:
        cache = self.kept_cache if self.kept_cache is not None else {}
        if n not in cache:
            cache[n] = kept_rows(mask[:, -n:])
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
            flat.shape[-1]
        )
        inv_rms = 1.0 / (rms.unsqueeze(1) + 1e-6)
        if self.calibration is not None:
            self.calibration[0] += (flat.float() * inv_rms).sum(0)
            self.calibration[1] += flat.shape[0]
        weight, bias = self._projection(flat.dtype)
        logits = torch.addcmul(bias, F.linear(flat, weight).float(), inv_rms)
        # the top-k probabilities renormalised = a softmax over the top-k logits
        top_logits, top_i = logits.topk(self.top_k, dim=-1)
        routing = Routing(top_i, torch.softmax(top_logits, dim=-1), kept, self.experts)
        # training only: a ghost batch (eval mode, see training/step.py) adds no term
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            probs = torch.softmax(logits, dim=-1)
            self.last_aux = load_balancing_loss(probs, top_i, self.experts)
        if self.training:  # counted apart from the slots: the dense path never sorts them
            self.usage += expert_counts(top_i, self.experts).to(self.usage.dtype)
        return routing
