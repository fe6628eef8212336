"""A method's default learning rate for the model at hand.

AdamW moves each trained entry by about the learning rate per step, whatever the size of
the weights it changes, so how far a step moves the model is the rate over the weights'
size. The default rates were swept on SmolLM2-135M-Instruct, whose decoder weights have an
RMS of 0.193; Gemma 3 270M's have 0.034 (``scale`` = 0.178), and there most methods' best
swept rate was lower (BENCHMARKS.md, "Default learning rates"). A method's default is its
swept rate x ``scale ** lr_weight_exponent``, the exponent read off the two models' sweeps
(both bundled tasks, three seeds each):

- full fine-tuning and sparse fine-tuning train base entries themselves: 1 (sparse at
  SmolLM2's 1e-3 scored 7-8 points under the scaled 2e-4 on Gemma; full's range test is
  centred on its scaled rate);
- shira (sparse entries beside the weights): 1.3, i.e. 1e-2 -> 1e-3: its best swept rate
  fell 10x from one model to the other, more than the weights (on each model 3e-3 scored
  1.3-6.2 points under its best, on both tasks);
- rosa (LoRA plus sparse entries): 0.7, i.e. 3e-4 on Gemma, its best there on both tasks;
- experts: 0.5 (1e-3 -> 4e-4, within 0.4 points of the best on Gemma's two tasks, where
  1e-3 was 2.2 and 0.9 points under);
- lora (and dora): 0, the rate is not scaled: on Gemma 1e-3 was within half a point of
  3e-4 on intents and the best swept rate on extraction.

So these exponents fit two models, not a law: a model with another weight size gets a rate
between or beyond two measured points. ``scale`` is the model's weight RMS over SmolLM2's,
capped at 1 (no model was swept with larger weights); the rate is rounded to one
significant digit, as a rate is chosen by hand. An explicit ``--lr`` is never scaled;
``--lr auto`` centres its range test on the scaled rate.
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
    (:func:`weight_scale`): the swept rate x ``scale ** method.lr_weight_exponent``."""
    if not method.lr_weight_exponent or scale == 1.0:
        return method.default_lr
    return float(f"{method.default_lr * scale**method.lr_weight_exponent:.1g}")
