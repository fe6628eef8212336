"""Left-padded inference that scores on CUDA as it does on the CPU.

A left-padded batch (scoring, generation, the server: each row's next token sits at the
end) has query rows at the pad positions whose causal window holds only masked keys.
transformers' ``sdpa_mask`` no longer opens such rows (its mask API since 4.53, with torch
2.5 or later), trusting torch to return something harmless for them. On CUDA, torch's
memory-efficient SDPA kernel does not: in a batch 65 tokens wide (65 % 32 == 1, the width
transformers#47651 names) it returned values that corrupted the real rows. Measured on an
H200 (torch 2.11, transformers 5.24, Gemma 3 270M, the intents test split, batch 16): a
LoRA delta scored 91.25% there and 96.25% at batch 1, under torch's math kernel, under
eager attention and on the CPU (BENCHMARKS.md, "Scoring on the GPU, fixed"; upstream:
transformers#47651, unsloth#9848).

:func:`padded_inference` wraps every left-padded forward slimtune runs, in two parts:

- on CUDA it holds SDPA to flash attention (unmasked calls) and torch's math kernel
  (masked ones). The math kernel gave the batch-1 result exactly; the memory-efficient
  kernel with the guard below still did not (a sparse delta: 92.92% against 93.33%; as
  before the fix, 88.75%);
- on any device, SDPA masks built inside it give each row that attends to nothing every
  key of its own row (:func:`attend_somewhere`). Such a row is a pad position's, which
  nothing reads (real queries never attend to pad keys; pad logits are never scored), so
  real rows keep their values; it spares kernels that return NaN for an empty row (torch's
  math kernel before 2.5, the CUDA kernels above) from spreading it.

Training right-pads, so no row there is empty, and outside this context nothing changes:
the GPU's right-padded test loss of Gemma 3 matched the CPU's to 4e-5 under the
memory-efficient kernel, a batch 65 wide included (BENCHMARKS.md).

torch's kernel switch is process-wide, not per thread: slimtune runs inference from one
thread at a time (the trainer's evaluation, or the server's one generation worker).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_GUARD_ON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "slimtune_mask_guard", default=False
)


def attend_somewhere(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` (a 4D SDPA mask, boolean or additive) with each row that attends to no key
    opened to all keys; ``None`` (no mask) stays ``None``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask | ~mask.any(-1, keepdim=True)
    blocked = mask <= torch.finfo(mask.dtype).min / 2  # the dtype's minimum, or -inf
    return mask.masked_fill(blocked.all(-1, keepdim=True), 0.0)


def install_mask_guard() -> bool:
    """Wrap transformers' SDPA mask builder so that, inside :func:`padded_inference`, its
    masks pass through :func:`attend_somewhere` (outside it the wrapper adds nothing).
    Idempotent; returns whether transformers has the mask interface (older versions
    opened such rows themselves)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    stock = AttentionMaskInterface._global_mapping.get("sdpa")
    if stock is None or getattr(stock, "slimtune_guarded", False):
        return stock is not None

    def guarded_sdpa_mask(*args, **kwargs):
        mask = stock(*args, **kwargs)
        return attend_somewhere(mask) if _GUARD_ON.get() else mask

    guarded_sdpa_mask.slimtune_guarded = True  # type: ignore[attr-defined]
    guarded_sdpa_mask.stock = stock  # type: ignore[attr-defined]
    AttentionMaskInterface.register("sdpa", guarded_sdpa_mask)
    return True


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a batch padded on the left, so that every row's next
    token is at the end; run its forwards under :func:`padded_inference`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def padded_inference(device: torch.device | str):
    """The ``with`` block runs left-padded inference: empty mask rows opened, and on CUDA
    SDPA held to flash attention and torch's math kernel."""
    install_mask_guard()
    token = _GUARD_ON.set(True)
    try:
        if torch.device(device).type != "cuda":
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            yield
    finally:
        _GUARD_ON.reset(token)
