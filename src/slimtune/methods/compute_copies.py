"""Adapter weights in the compute dtype, made once per optimizer step for every layer.

Under autocast an adapter's fp32 master weights would be cast to bf16 in every layer's
forward (two copies per adapted linear per micro-batch, and their casts back in backward).
A small model's GPU step is bound by the host, and those casts were two of each layer's few
kernels. :class:`ComputeCopies` makes the copies of all layers at once (a few multi-tensor
kernels) when any weight changed, and LoRA (``lora_fused``) and the expert adapters
(``experts/fused``) compute from them. The master weights stay the optimizer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# (A, B) -> the tensors to copy, views of them in the layout the GEMMs read
Layout = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ComputeCopies:
    """Every registered layer's pair ``(A, B)`` in the compute dtype, ``A`` times the scale,
    each copy contiguous; a layer registered with a ``layout`` gets its copies in that
    layout (the experts' stacked ``B`` permuted into the GEMM's (out, E, r)).

    A copy is current until any optimizer steps (a global step hook while
    :func:`step_copies` is entered: fused AdamW does not bump the parameters' versions) and
    while its parameter is the same tensor with the same storage at the same version (any
    other in-place write through it, or new storage given through ``.data =``; not an
    in-place write through ``.data``, which slimtune does not do inside a run). Under FSDP2
    (parameters gathered per layer, ``cached=False``), in a compiled layer and under
    inference mode each forward casts its own (:func:`cast_now`)."""

    def __init__(self, cached: bool) -> None:
        self.cached = cached
        self.params: list[tuple[torch.Tensor, torch.Tensor, float, Layout | None]] = []
        self.copies: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen: dict[tuple[int, torch.dtype], tuple[int, ...]] = {}

    def add(
        self, a: torch.Tensor, b: torch.Tensor, scaling: float, layout: Layout | None = None
    ) -> int:
        self.params.append((a, b, scaling, layout))
        return len(self.params) - 1

    def get(
        self, i: int, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ``(A * scaling, B)`` in ``dtype``; ``a``, ``b``, ``scaling`` are what
        the layer holds now (a layer whose adapter changed since the block began casts its
        own)."""
        if (
            not self.cached
            or i < 0
            or torch.is_inference_mode_enabled()  # its tensors could not be saved later
            or not _same(self.params[i], (a, b, scaling))
        ):
            return cast_now(a, b, scaling, dtype, self.params[i][3] if i >= 0 else None)
        key = (i, dtype)
        if self.seen.get(key) != _state(a, b):
            self._refresh(dtype)
        return self.copies[key]

    @torch.no_grad()
    def _refresh(self, dtype: torch.dtype) -> None:
        stale = [
            i
            for i, (a, b, _, _) in enumerate(self.params)
            if self.seen.get((i, dtype)) != _state(a, b)
        ]
        # made now from the parameters as they are (a view made once would keep old storage)
        sources = {i: _laid_out(*self.params[i]) for i in stale}
        for i in stale:
            a, b = sources[i]
            if (i, dtype) not in self.copies:
                self.copies[(i, dtype)] = (
                    torch.empty(a.shape, dtype=dtype, device=a.device),
                    torch.empty(b.shape, dtype=dtype, device=b.device),
                )
        # A scaled in its own dtype, then cast: rounded once, as cast_now does
        scaled = torch._foreach_mul(
            [sources[i][0] for i in stale], [self.params[i][2] for i in stale]
        )
        torch._foreach_copy_(
            [t for i in stale for t in self.copies[(i, dtype)]],
            [t for a_s, i in zip(scaled, stale) for t in (a_s, sources[i][1])],
        )
        for i in stale:
            a, b, _, _ = self.params[i]
            self.seen[(i, dtype)] = _state(a, b)


def _laid_out(a: torch.Tensor, b: torch.Tensor, _scaling: float, layout: Layout | None):
    return (a, b) if layout is None else layout(a, b)


def cast_now(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    layout: Layout | None = None,
):
    """One layer's ``(A * scaling, B)`` in ``dtype`` (and ``layout``), made now (no copy
    kept)."""
    a, b = _laid_out(a, b, scaling, layout)
    contiguous = torch.contiguous_format
    return (
        torch.mul(a, scaling).to(dtype, memory_format=contiguous),
        b.to(dtype, memory_format=contiguous),
    )


def mm_to(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m1 @ m2`` in ``dtype`` (an adapter gradient in its fp32): on CUDA the GEMM writes
    fp32 itself (cuBLAS accumulates in fp32 anyway), elsewhere a matmul and a cast."""
    if (
        dtype == torch.float32
        and m1.dtype in (torch.float16, torch.bfloat16)
        and m1.is_cuda
        and _MM_OUT_DTYPE
    ):
        return torch.mm(m1, m2, out_dtype=dtype)
    return (m1 @ m2).to(dtype)


# torch.mm(..., out_dtype=) (bf16/fp16 in, fp32 out) exists on CUDA from torch 2.8
_MM_OUT_DTYPE = "out_dtype" in (torch.mm.__doc__ or "")


def _same(held: tuple, now: tuple) -> bool:
    return held[0] is now[0] and held[1] is now[1] and held[2] == now[2]


def _state(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    return (a._version, b._version, a.data_ptr(), b.data_ptr())


@contextlib.contextmanager
def step_copies(model: nn.Module) -> Iterator[ComputeCopies]:
    """A :class:`ComputeCopies` for ``model`` whose copies any optimizer's step makes stale,
    while the block is entered."""
    copies = ComputeCopies(cached=not _sharded(model))
    # any optimizer's step (fused AdamW and bitsandbytes' write without bumping the
    # parameters' versions) makes every copy stale
    hook = register_optimizer_step_post_hook(lambda *_: copies.seen.clear())
    try:
        yield copies
    finally:
        hook.remove()


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``: its parameters are gathered per layer for that
    layer's forward only, so no copy of them can be made ahead."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
