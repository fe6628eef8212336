"""Freeze the bottom of the network so that backpropagation really stops there.

Setting ``requires_grad=False`` is not enough: anything that makes an activation below the
cut require grad (a trainable adapter below it, or peft's ``enable_input_require_grads``
used with gradient checkpointing) makes autograd record the whole frozen block again.
Here each frozen decoder layer's forward runs under ``torch.no_grad()``, so no graph and
no saved activations exist below the cut, whatever else is attached.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import UserInputError
from ..model.anatomy import decoder_layers, input_embeddings


def freeze_below(model: nn.Module, k: int) -> None:
    """Freeze the input embeddings and decoder layers ``0 .. k-1``; run them without autograd.

    With tied input/output embeddings the output head is frozen too (it is the same tensor).
    ``k = 0`` freezes nothing; ``k = num_layers`` freezes every decoder layer.
    """
    layers = decoder_layers(model)
    if not 0 <= k <= len(layers):
        raise UserInputError(
            f"--freeze-below {k}: the model has {len(layers)} layers, "
            f"so it must be between 0 and {len(layers)}"
        )
    if k == 0:
        return
    emb = input_embeddings(model)
    if emb is not None:
        emb.requires_grad_(False)
    for layer in layers[:k]:
        layer.requires_grad_(False)
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
        if "forward" not in layer.__dict__:  # idempotent
            layer.forward = _no_grad(layer.forward)


def unfreeze_all(model: nn.Module) -> None:
    """Undo :func:`freeze_below`'s no-grad patching (``requires_grad`` is left to the method)."""
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)


def _no_grad(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    run.slimtune_frozen = True
    return run


def frozen_layer_count(model: nn.Module) -> int:
    return sum(
        1
        for layer in decoder_layers(model)
        if getattr(layer.__dict__.get("forward"), "slimtune_frozen", False)
    )
