"""Full fine-tuning of the chosen layers: every weight in them trains.

The delta holds the new values of the trained tensors, not differences, so applying it
reproduces the trained model bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..errors import DeltaError
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

    def load(self, model: nn.Module, folder: Path) -> nn.Module:
        state = load_file(str(folder / WEIGHTS_FILE))
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name not in params:
                raise DeltaError(f"{folder / WEIGHTS_FILE}: tensor {name!r} is not in the model")
            if params[name].shape != value.shape:
                raise DeltaError(f"{folder / WEIGHTS_FILE}: tensor {name!r} has shape "
                                 f"{tuple(value.shape)}, the model's is {tuple(params[name].shape)}")
            params[name].data.copy_(value)
        return model


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last decoder layer (``model.norm`` for Llama-style models)."""
    base = getattr(model, "model", None)
    for owner in (base, model):
        for attr in ("norm", "final_layernorm", "ln_f"):
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    return None
