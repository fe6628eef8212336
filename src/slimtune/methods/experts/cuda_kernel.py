"""Fused inference kernel for routed expert adapters on CUDA (Triton; hand-written, like its
CPU twin ``cpu_kernel.c``, because no library runs a low-rank update whose weights differ
per token).

The gathered path in ``layer.py`` writes k rows of the full output width per token (one per
routing slot) and then accumulates them into the base output: k times the memory traffic of
a dense LoRA's update, and that traffic, not the FLOPs, is what a low-rank update costs on a
GPU. This kernel removes it by grouping tokens by their *set* of k experts instead of by
single expert:

* tokens with the same sorted top-k expert set form one group (``combination key``);
  a group is cut into tiles of at most ``BM`` tokens, so every tile's rows share their k
  experts;
* one program per tile gathers its token rows of x, runs them through the k chosen A's at
  once (a ``K*R``-wide low-rank projection, gated per token), then through the k chosen B's
  and adds the result to the token rows of the base output in place: one read and one write
  of each output row, the traffic of a dense LoRA of rank k*r.

So each token still runs only its k experts (FLOPs ``k*r*(in+out)``, whatever E is), and an
expert no token chose is never read. Row results do not depend on the other rows of a tile,
so the output is deterministic. Training keeps the autograd path in ``layer.py``.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; without it the gathered path runs instead
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK_M = 64  # tokens per tile in prefill
SMALL_BATCH = 64  # up to this many routed tokens (decode), one token per tile, no sorting


def available() -> bool:
    return triton is not None


@dataclass
class TilePlan:
    """One layer's routing, laid out for the kernel; shared by the layer's adapted linears."""

    tokens: torch.Tensor  # (N,) flat token row of each sorted position
    keys: torch.Tensor  # (N,) combination key of each sorted position (tiles stop where it changes)
    experts: torch.Tensor  # (N, k) sorted expert ids of each sorted position
    gates: torch.Tensor  # (N, k) float32 gates matching ``experts``
    tiles: torch.Tensor  # (n_tiles,) first sorted position of each tile; N = no tile
    block_m: int


def set_keys(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Each row's expert set (ids ascending, (N, k)) as one base-E number."""
    key = ids[:, 0]
    for j in range(1, ids.shape[1]):
        key = key * experts + ids[:, j]
    return key


def plan_tiles(
    top_i: torch.Tensor, top_g: torch.Tensor, kept: torch.Tensor | None, experts: int
) -> TilePlan:
    """Group the routed tokens by their set of experts and cut the groups into tiles, with
    tensor ops only (no host sync: the tile count is an upper bound; spare tiles exit)."""
    n, k = top_i.shape
    pos = torch.arange(n, device=top_i.device)
    if n <= SMALL_BATCH:  # one token per tile, its own key: no sorting
        tokens = pos if kept is None else kept
        return TilePlan(tokens, pos, top_i.contiguous(), top_g.float().contiguous(), pos, 16)
    ids, order = top_i.sort(dim=1)  # a tile reads its experts in one order: ascending
    gates = top_g.float().gather(1, order)
    keys, perm = set_keys(ids, experts).sort()
    group_start = torch.searchsorted(keys, keys)  # first position of each position's set
    starts = (pos - group_start) % BLOCK_M == 0
    n_tiles = -(-n // BLOCK_M) + min(n, math.comb(experts, k))
    slot = torch.where(starts, starts.cumsum(0) - 1, n_tiles)
    tiles = torch.full((n_tiles + 1,), n, dtype=torch.int64, device=ids.device)
    tiles.index_put_((slot,), pos)  # the spare slot n_tiles takes every non-start
    tokens = perm if kept is None else kept[perm]
    return TilePlan(tokens, keys, ids[perm], gates[perm], tiles[:n_tiles], BLOCK_M)


def supports(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, experts: int, k: int) -> bool:
    """Whether the fused kernel can run this linear (else the gathered path does): CUDA, or
    any device under Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run it)."""
    device_ok = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        triton is not None
        and device_ok
        and x.dtype == out.dtype == a.dtype
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k * math.log2(max(experts, 2)) < 62
    )  # the expert-set key fits in int64


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )


def add_routed_lowrank(
    x: torch.Tensor,
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: TilePlan,
    scaling: float,
) -> None:
    """``out[t] += scaling * sum_j g_tj * B_{e_tj} A_{e_tj} x[t]`` for every routed token t,
    in place. ``x`` (T, in), ``out`` (T, out), ``a`` (E, r, in), ``b`` (E, out, r)."""
    n = plan.tokens.shape[0]
    if n == 0:
        return
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    d_in, d_out, rank, k = x.shape[1], out.shape[1], a.shape[1], plan.experts.shape[1]
    r_pad = triton.next_power_of_2(rank)
    kr = max(16, triton.next_power_of_2(k * r_pad))
    bn = 64 if d_out <= 64 else 128
    # split the output columns over programs when there are few tiles (decode) or the
    # update is wide; each split recomputes its tile's (cheap) projection through A
    n_tiles = plan.tiles.shape[0]
    sms = _multiprocessors(x.device)
    col_blocks = triton.cdiv(d_out, bn)
    split = min(col_blocks, triton.cdiv(4 * sms, n_tiles))
    cols = triton.cdiv(col_blocks, split) * bn
    grid = (n_tiles, triton.cdiv(d_out, cols))
    switch = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else nullcontext():
        _routed_lowrank_kernel[grid](
            x,
            out,
            a,
            b,
            plan.tokens,
            plan.keys,
            plan.tiles,
            plan.experts,
            plan.gates,
            n,
            d_in,
            d_out,
            rank,
            cols,
            scaling,
            K=k,
            R=r_pad,
            KR=kr,
            BM=plan.block_m,
            BK=64,
            BN=bn,
            IEEE=x.dtype == torch.float32,
        )


if triton is not None:

    @triton.jit
    def _routed_lowrank_kernel(
        x_ptr,
        y_ptr,
        a_ptr,
        b_ptr,
        tok_ptr,
        key_ptr,
        tile_ptr,
        eid_ptr,
        gate_ptr,
        n_rows,
        d_in,
        d_out,
        rank,
        cols_per_split,
        scaling,
        K: tl.constexpr,
        R: tl.constexpr,
        KR: tl.constexpr,
        BM: tl.constexpr,
        BK: tl.constexpr,
        BN: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        start = tl.load(tile_ptr + tl.program_id(0))
        if start >= n_rows:
            return
        rows = start + tl.arange(0, BM)
        in_range = rows < n_rows
        keys = tl.load(key_ptr + rows, mask=in_range, other=-1)
        valid = in_range & (keys == tl.load(key_ptr + start))  # rows of this tile's group
        tok = tl.load(tok_ptr + rows, mask=valid, other=0).to(tl.int64)
        # column c of the K*R-wide projection is rank c % R of the tile's (c // R)-th expert
        cols = tl.arange(0, KR)
        slot = cols // R
        r_idx = cols % R
        col_ok = (slot < K) & (r_idx < rank)
        eid = tl.load(eid_ptr + start * K + slot, mask=slot < K, other=0).to(tl.int64)
        gate = tl.load(
            gate_ptr + rows[:, None] * K + slot[None, :],
            mask=valid[:, None] & (slot < K)[None, :],
            other=0.0,
        )
        # z = (x_tile @ [A_e1; ...; A_ek]^T) * gates: (BM, KR)
        z = tl.zeros((BM, KR), dtype=tl.float32)
        a_rows = a_ptr + (eid * rank + r_idx) * d_in
        for k0 in range(0, d_in, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < d_in
            xt = tl.load(
                x_ptr + tok[:, None] * d_in + ks[None, :],
                mask=valid[:, None] & k_ok[None, :],
                other=0.0,
            )
            at = tl.load(
                a_rows[None, :] + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            if IEEE:
                z += tl.dot(xt, at, input_precision="ieee")
            else:
                z += tl.dot(xt, at)
        z = (z * gate * scaling).to(b_ptr.dtype.element_ty)
        # out_tile += z @ [B_e1 ... B_ek]^T, column block by column block
        b_cols = b_ptr + eid * d_out * rank + r_idx
        n_lo = tl.program_id(1) * cols_per_split
        n_hi = tl.minimum(n_lo + cols_per_split, d_out)
        for n0 in range(n_lo, n_hi, BN):
            ns = n0 + tl.arange(0, BN)
            n_ok = ns < n_hi
            bt = tl.load(
                b_cols[:, None] + ns[None, :] * rank,
                mask=col_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            y_ptrs = y_ptr + tok[:, None] * d_out + ns[None, :]
            m = valid[:, None] & n_ok[None, :]
            acc = tl.load(y_ptrs, mask=m, other=0.0).to(tl.float32)
            if IEEE:
                acc += tl.dot(z, bt, input_precision="ieee")
            else:
                acc += tl.dot(z, bt)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m)
