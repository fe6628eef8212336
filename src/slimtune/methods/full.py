"""Full fine-tuning of the chosen layers: every weight in them trains.

The delta holds the new values of the trained tensors, not differences, so applying it
reproduces the trained model bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import DeltaError
from ..fileio import write_safetensors
from ..model.anatomy import decoder_layers, final_norm
from .base import Attachment, Method, MethodConfig, register_method

WEIGHTS_FILE = "weights.safetensors"


@register_method
class FullMethod(Method):
    name = "full"
    config_class = MethodConfig
    # Without --lr the range test chooses (BENCHMARKS.md, "--lr auto"): full fine-tuning's
    # best rate moves with the model by more than any fixed default can follow (3e-4 on the
    # 135M default model, 12-16 points over 1e-4; multi-billion models take ~1e-5)
    default_lr = 1e-4
    auto_lr = True
    lr_weight_exponent = 1.0
    delta_files = (WEIGHTS_FILE,)
    trains_embeddings = True
    weight_grads = True
    shardable = True
    quantizations = ()
    why_not_quantized = (
        "full fine-tuning trains the base weights themselves, and quantized weights take no "
        "gradient; train a delta beside them (lora, sparse, rosa, experts) or drop --quantize"
    )

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        all_layers = decoder_layers(model)
        train_all = list(layers) == list(range(len(all_layers)))
        model.requires_grad_(train_all)
        if not train_all:
            for i in layers:
                all_layers[i].requires_grad_(True)
            norm = final_norm(model)
            if norm is not None:
                norm.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path) -> None:
        state: dict[str, torch.Tensor] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        write_safetensors(folder / WEIGHTS_FILE, state)

    @classmethod
    def attach(
        cls, model: nn.Module, folder: Path, manifest: dict[str, Any], *, merge: bool
    ) -> Attachment:
        """Replace the trained tensors, keeping their originals to put back (always merged)."""
        state = load_file(str(folder / WEIGHTS_FILE))
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise DeltaError(f"{folder}: tensors {missing[:3]} are not in the model")
        original = {n: params[n].detach().clone() for n in state}
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise DeltaError(
                        f"{folder}: {n} has shape {tuple(v.shape)}, the model's is "
                        f"{tuple(params[n].shape)}"
                    )
            for n, v in state.items():
                params[n].copy_(v)

        def undo() -> None:
            with torch.no_grad():
                for n, v in original.items():
                    params[n].copy_(v)

        return Attachment(model, True, undo)
