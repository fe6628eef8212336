"""Left-padded inference that scores on CUDA as it does on the CPU.

A left-padded batch (scoring, generation, the server: each row's next token sits at the
end) has query rows at the pad positions whose causal window holds only masked keys.
transformers' ``sdpa_mask`` stopped un-masking such rows in its 5.x mask API, trusting
torch to return something harmless for them. On CUDA, torch's memory-efficient SDPA
kernel does not: in batches of some widths it returns values that then corrupt the real
rows. Measured on an H200 (torch 2.11, transformers 5.24, Gemma 3 270M, the intents test
split, batch 16): one batch in fifteen came back wrong, 5 points of accuracy lost for the
same delta that scores right at batch 1, under torch's math kernel, under eager attention
and on the CPU (BENCHMARKS.md, "Scoring on the GPU"). The upstream reports:
transformers#47651, unsloth#9848.

Two parts, both needed on that H200:

- :func:`install_mask_guard` lets such a row attend to every key of its own row. Its
  output is a pad position's, which nothing reads (real queries never attend to pad keys,
  pad logits are never scored), so real rows are unchanged where the kernels were right.
  It took the batch from 91.25% to 93.75%, and the base's loss on the split from 8.21 to
  7.70.
- :func:`exact_padded_attention` keeps the memory-efficient kernel out of left-padded
  inference on CUDA: the batch that went wrong is 65 tokens wide (65 % 32 == 1, the width
  transformers#47651 names), and with the guard alone it still scored 93.75% against
  94.17% at batch 1 (base loss 7.70 against 7.65). torch's math kernel matched batch 1 and
  the CPU exactly. Flash attention, which takes no mask, still serves unpadded batches.

Training right-pads: no row there attends to nothing, and its losses matched the CPU's to
4e-5 under the memory-efficient kernel (BENCHMARKS.md), so it keeps the fast kernel.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def attend_somewhere(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` (a 4D SDPA mask, boolean or additive) with each row that attends to no key
    opened to all keys; ``None`` (no mask) stays ``None``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask | ~mask.any(-1, keepdim=True)
    blocked = mask == torch.finfo(mask.dtype).min
    empty = blocked.all(-1, keepdim=True)
    return mask.masked_fill(empty, 0.0)


@functools.cache
def install_mask_guard() -> bool:
    """Wrap transformers' SDPA mask builder with :func:`attend_somewhere`, once per process
    (its mask interface is global); returns whether transformers has that interface."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers before the mask interface: it un-masked such rows
        return False
    stock = AttentionMaskInterface._global_mapping.get("sdpa")
    if stock is None or getattr(stock, "slimtune_guarded", False):
        return stock is not None

    @functools.wraps(stock)
    def guarded_sdpa_mask(*args, **kwargs):
        return attend_somewhere(stock(*args, **kwargs))

    guarded_sdpa_mask.slimtune_guarded = True  # type: ignore[attr-defined]
    guarded_sdpa_mask.stock = stock  # type: ignore[attr-defined]
    AttentionMaskInterface.register("sdpa", guarded_sdpa_mask)
    return True


@contextlib.contextmanager
def exact_padded_attention(device: torch.device | str):
    """On CUDA, SDPA held to flash attention (unmasked calls) and torch's math kernel
    (masked ones) for the ``with`` block; elsewhere nothing changes. For inference on
    left-padded batches, whose cost is small beside training's."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        yield
