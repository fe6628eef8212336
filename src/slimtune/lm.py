"""The training loss, computed where it is needed and nowhere else.

The output head runs only on positions that have a target token (a classification
completion is 2 tokens of ~60), and on many targets it runs in chunks whose logits are
recomputed in backward rather than stored: peak memory holds one chunk of
``chunk x vocab`` logits instead of ``batch x length x vocab``.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

CHUNK_ROWS = 1024


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap a PEFT model (its injected adapters stay in place in the base modules)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the KV-cache argument's name in this transformers version
    (``cache`` since 5.2x, ``past_key_values`` before)."""
    return {_cache_kwarg_of(type(base_model(model))): cache}


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder stack, output head) if the head is a plain projection of the last hidden state."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    backbone = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Linear):
        return None
    return backbone, head


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    n = int(mask.sum())
    parts = backbone_and_head(model)
    if parts is None:  # architectures with logit post-processing: the model's own head path
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), n
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state[:, :-1]
    h, t = hidden[mask], targets[mask]
    if h.shape[0] <= CHUNK_ROWS:
        return _ce_sum(head, h, t), n
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], CHUNK_ROWS):
        hs, ts = h[s: s + CHUNK_ROWS], t[s: s + CHUNK_ROWS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, head, hs, ts, use_reentrant=False)
        else:
            total = total + _ce_sum(head, hs, ts)
    return total, n
