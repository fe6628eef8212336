"""Full fine-tuning of the chosen layers: every weight in them trains.

The delta holds the new values of the trained tensors, not differences, so applying it
reproduces the trained model bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..fileio import write_safetensors
from ..models import decoder_layers
from .base import Method, MethodConfig

WEIGHTS_FILE = "weights.safetensors"


class FullMethod(Method):
    name = "full"
    config_class = MethodConfig

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        all_layers = decoder_layers(model)
        train_all = list(layers) == list(range(len(all_layers)))
        model.requires_grad_(train_all)
        if not train_all:
            for i in layers:
                all_layers[i].requires_grad_(True)
            norm = _final_norm(model)
            if norm is not None:
                norm.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        write_safetensors(folder / WEIGHTS_FILE, state)


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last decoder layer (``model.norm`` for Llama-style models)."""
    base = getattr(model, "model", None)
    for owner in (base, model):
        for attr in ("norm", "final_layernorm", "ln_f"):
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    return None
