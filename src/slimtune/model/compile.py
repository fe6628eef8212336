"""``torch.compile`` of each decoder layer for the training step (``train --compile``).

A step of a mid-sized model on a fast GPU is bound by the host as much as by the GPU: every
adapted linear costs Python (peft's forward, a method's autograd function, casts) and a
handful of kernel launches, forward and backward. Compiling each decoder layer's forward
(regional compilation, as torchtune and torchtitan do) turns it and its backward into a few
generated kernels with the elementwise work fused. The compile is paid once per run (23-90
s for a 1.2B model on an H200, in the first step) and shared by every layer: the layers
are one code object, their weights are inputs, not constants. Shapes are dynamic, so
batches of every padded length run one graph.

What it buys is measured in BENCHMARKS.md ("train --compile"): a lot where the host bounds
the step (experts 1.6x, LoRA on a 4-bit 8B base at batch 1 1.6x), little where the GPU
does (LoRA on a 1.2B model 1.0-1.2x, sparse none). Without gradient checkpointing on a
4-bit base it costs memory (27.6 against 14.7 GiB on an 8B model; the cause is not
established, likely saved 16-bit copies of the weights), so use it there with
``--gradient-checkpointing``.

Only the decoder layers are compiled, with their module hooks (the expert router's
routing is one: compiled, it is a large part of the gain for experts): the embeddings, the
head and the loss (Liger's fused linear cross-entropy, or the chunked one) keep their own
kernels. FSDP2's hooks on the layers are not traced: ``--compile`` with ``--fsdp`` is
refused (untested). Inductor generates the
RMSNorm, SwiGLU and RoPE fusions itself, so Liger's versions of those are not patched in
(``kernels.apply_fused_kernels(elementwise=False)``). What torch cannot trace (SHiRA's
sparse tensors, the routed expert paths: the CPU's, ``--expert-dispatch routed``) runs
eagerly between compiled parts.

The layers run compiled only inside :func:`compiled_layers`, in training mode with
gradients: an evaluation inside the loop, and generation, run the layers as they are.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from ..errors import UserInputError
from .anatomy import decoder_layers

# How many variants of one compiled frame torch may make before it runs it eagerly. A
# layer usually has two (the first layer's input, from frozen embeddings, needs no
# gradient; the others' does); frozen layers below trained ones, a batch of one, experts'
# padded and unpadded batches add some; where a method's linear runs eagerly inside
# (routed experts, SHiRA), that linear's forward is a frame of its own, one variant per
# weight shape. Past the limit a frame runs eagerly, and torch warns.
RECOMPILE_LIMIT = 16
# inductor generates the kernels; "aot_eager" traces the same graphs without generating
# code (the tests; SLIMTUNE_COMPILE_BACKEND=aot_eager to tell inductor's faults from tracing's)
BACKEND = os.environ.get("SLIMTUNE_COMPILE_BACKEND", "inductor")


@contextlib.contextmanager
def compiled_layers(
    model: nn.Module, *, backend: str | None = None, cuda_graphs: bool = False
) -> Iterator[int]:
    """Within the block, ``model``'s decoder layers run compiled, their module hooks
    included (the expert routers'); yields how many. The first step inside pays the
    compile (tens of seconds for a billion-parameter model); later blocks on the same model
    reuse it. Inductor draws random numbers (dropout) as eager torch does, so a compiled
    run takes the same dropout masks as an eager one.

    ``cuda_graphs`` replays each compiled layer as a CUDA graph (inductor's
    "reduce-overhead"): benchmarks only (``bench_methods.py``'s ``+graphs`` rows), not a
    flag of ``train`` yet. Compiled so, a host-bound step ran 3-4x faster than eager (full,
    experts), but a graph is recorded per batch width and per count of routed rows, and
    LoRA's run crashed; BENCHMARKS.md, "CUDA graphs over the compiled layers"."""
    import torch._dynamo
    import torch._inductor.config

    backend = backend or BACKEND
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserInputError(
            f"SLIMTUNE_COMPILE_BACKEND={backend!r} is not a torch.compile backend; "
            "use inductor (the default) or aot_eager"
        )
    if cuda_graphs and backend != "inductor":
        raise UserInputError(f"CUDA graphs come from inductor; the backend is {backend!r}")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name), torch._inductor.config.fallback_random
    layers = decoder_layers(model)
    try:
        setattr(config, name, max(before[0], RECOMPILE_LIMIT))
        torch._inductor.config.fallback_random = True
        for layer in layers:
            # nn.Module.compile's slot: __call__ runs it in place of hooks + forward
            layer._compiled_call_impl = _compiled_call(layer, backend, cuda_graphs)
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        setattr(config, name, before[0])
        torch._inductor.config.fallback_random = before[1]


def _compiled_call(layer: nn.Module, backend: str, cuda_graphs: bool = False):
    """The layer's call, its module hooks included: compiled in training mode with
    gradients (made once per layer, backend and graph mode, kept on it); eagerly in eval mode or
    without gradients (an evaluation inside the training loop), which would otherwise
    compile graphs of their own."""
    import torch

    call_impl = layer._call_impl
    cache = layer.__dict__.setdefault("_slimtune_compiled", {})
    key = (backend, cuda_graphs)
    if key not in cache:
        # dynamic: batches are padded to their longest example, so lengths vary; one
        # graph for all of them, not one per length (nor a first static one)
        mode = "reduce-overhead" if cuda_graphs else None
        cache[key] = torch.compile(call_impl, backend=backend, dynamic=True, mode=mode)
    compiled = cache[key]

    def call(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return call_impl(*args, **kwargs)

    return call
