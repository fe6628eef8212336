"""A method's default learning rate for the model at hand.

Full fine-tuning, sparse fine-tuning and RoSA's sparse part train entries of the base
weights themselves. AdamW moves each entry by about the learning rate per step, whatever
the entry's size, so how far a step moves the model is the rate over the weights' size: the
rate that trains a model well follows the size of its weights. The default rates were swept
on SmolLM2-135M-Instruct, whose decoder weights have an RMS of 0.193; Gemma 3 270M's have
0.034 (5.6x smaller), and there sparse and rosa at the sweep's 1e-3 scored 7-8 points
under the scaled 2e-4 (BENCHMARKS.md, "Default learning rates"). So these methods' default is the swept
rate times the model's weight RMS over SmolLM2's, capped at the swept rate (no model was
swept with larger weights) and rounded to one significant digit, as a rate is chosen by
hand. LoRA-style adapters (lora, experts, dora) learn a product whose size does not follow
the base's and keep their swept rate; so does SHiRA (its sweep on Gemma did not favour a
lower rate). An explicit ``--lr`` is never scaled; ``--lr auto`` centres its range test on
the scaled rate.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.base import Method
from ..model.anatomy import decoder_layers
from ..model.quantize import dense_weight

#: SmolLM2-135M-Instruct's decoder linear weights (every entry of every layer's linears),
#: the model the default rates were swept on (benchmarks/lr_sweep.py)
REFERENCE_RMS = 0.1934
#: the smallest factor: a model whose weights read as almost zero (a broken load) must not
#: get a rate that trains nothing
MIN_SCALE = 0.02


def weight_rms(model: nn.Module) -> float | None:
    """The root mean square of every entry of the decoder layers' linear weights
    (a quantized weight dequantized, one at a time), or None where there are none (a model
    whose layers hold no ``nn.Linear``, e.g. GPT-2's Conv1D, keeps the swept rate; experts
    kept as 3-D tensors are not read)."""
    total: torch.Tensor | float = 0.0
    count = 0
    with torch.no_grad():
        for layer in decoder_layers(model):
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    w = dense_weight(module)  # a dequantized copy only where quantized
                    squares = torch.linalg.vector_norm(w, dtype=torch.float32) ** 2
                    total = total + squares  # on the weights' device: one sync at the end
                    count += w.numel()
    return (float(total) / count) ** 0.5 if count else None


def weight_scale(model: nn.Module) -> float:
    """The model's weight RMS over the reference's, in [MIN_SCALE, 1]."""
    rms = weight_rms(model)
    if rms is None:
        return 1.0
    return min(1.0, max(MIN_SCALE, rms / REFERENCE_RMS))


def scaled_default_lr(method: type[Method], scale: float) -> float:
    """``method``'s default rate for a model of weight scale ``scale``
    (:func:`weight_scale`): scaled only where the method trains base entries."""
    if not method.lr_follows_weights:
        return method.default_lr
    return float(f"{method.default_lr * scale:.1g}")
