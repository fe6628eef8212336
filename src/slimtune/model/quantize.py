"""A quantized frozen base: the decoder blocks' linear weights in 4-bit NF4 or 8-bit int8.

The usual way to fine-tune a 7-8B model on one consumer GPU (QLoRA): the base weights are
stored quantized and dequantized per matmul, the trained delta stays in 16/32 bits. The
kernels and formats are `bitsandbytes <https://github.com/bitsandbytes-foundation/
bitsandbytes>`_' (``pip install 'slimtune[quant]'``), which runs on CUDA and on the CPU.

* ``nf4``: 4-bit NormalFloat with double quantization (its block scales quantized too),
  computing in the model's dtype (bf16 on a GPU): about 0.52 bytes per weight.
* ``int8``: LLM.int8() (int8 weights, outlier features in 16 bits): 1 byte per weight.

Only the linear layers inside the decoder blocks are quantized; embeddings, norms and the
output head keep the load dtype (the output head is what SALF reads hidden states
through). The model is loaded at full precision on the CPU first, fingerprinted there,
and quantized layer by layer onto the device, so the device never holds the full-precision
weights and a delta trained on the quantized base is a delta of the *original* base: its
manifest records the original base's fingerprint, and it applies to the full-precision
base as well as to the quantized one.

A delta cannot be written into quantized weights: sparse deltas run beside them
(``y = base_q(x) + x S^T``), LoRA goes through peft's bitsandbytes layers, and full
fine-tuning is refused.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import UserInputError
from .anatomy import decoder_layers

QUANTIZATIONS = ("none", "nf4", "int8")
INSTALL_HINT = "pip install 'slimtune[quant]' (bitsandbytes)"
# devices bitsandbytes' 4-bit and 8-bit layers run on here (its CPU backend since 0.46)
DEVICES = ("cuda", "cpu")

# bytes per weight of a quantized linear, for plan's estimates: NF4 packs two weights in a
# byte plus one fp32 absmax per 64 weights, itself quantized to 8 bits per block of 256
# (double quantization: 8/64 + 32/(64*256) bits); int8 stores one fp32 scale per row
BYTES_PER_WEIGHT = {"none": None, "nf4": 0.5 + (8 / 64 + 32 / (64 * 256)) / 8, "int8": 1.0}


def check_quantize(kind: str, device: str) -> None:
    """``kind`` is known, its backend is installed and runs on ``device``: a one-line
    error with the install hint otherwise (before anything is loaded)."""
    if kind not in QUANTIZATIONS:
        raise UserInputError(f"--quantize {kind!r}: use one of {', '.join(QUANTIZATIONS)}")
    if kind == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError(f"--quantize {kind} needs bitsandbytes, not installed: {INSTALL_HINT}")
    kind_of_device = torch.device(device).type
    if kind_of_device not in DEVICES:
        raise UserInputError(
            f"--quantize {kind}: bitsandbytes does not run on {device} here; "
            f"use --device {' or '.join(DEVICES)}, or --quantize none"
        )


def _quantized_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights (quantized when moved to a device)."""
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    w = linear.weight.data
    q: nn.Module
    if kind == "nf4":
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        # bitsandbytes repacks a 4-bit weight in place for its AVX-512 CPU kernel on the
        # first no-grad eval forward: a layout its training path and dequantize_4bit do
        # not read (and that fails on small widths). Keep the one layout.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def quantize_model(model: nn.Module, kind: str, device: str | torch.device) -> int:
    """Replace the decoder blocks' ``nn.Linear`` layers of ``model`` (on the CPU) by
    bitsandbytes layers on ``device``, one at a time; return how many. The rest of the
    model stays where it is (the caller moves it)."""
    if kind == "none":
        return 0
    compute_dtype = next(model.parameters()).dtype  # the load dtype: bf16 on a GPU
    count = 0
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    q = _quantized_linear(child, kind, compute_dtype).to(device)  # quantizes
                    setattr(parent, name, q)
                    del child
                    count += 1
    # what peft reads to wrap these layers with its bitsandbytes LoRA layers
    model.is_loaded_in_4bit = kind == "nf4"
    model.is_loaded_in_8bit = kind == "int8"
    model.slimtune_quantization = kind
    return count


def quantization_of(model: nn.Module) -> str:
    """``nf4``, ``int8`` or ``none``: how the base under ``model`` (peft-wrapped too) is stored."""
    for m in model.modules():
        kind = getattr(m, "slimtune_quantization", None)
        if kind is not None:
            return str(kind)
    return "none"


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantized (a bitsandbytes layer)."""
    cls = type(getattr(module, "weight", None)).__name__
    return cls in ("Params4bit", "Int8Params")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, quantized or not (a packed weight has another shape)."""
    return (int(module.out_features), int(module.in_features))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as a float matrix (out, in): the weight itself, or a dequantized
    copy of a quantized one (what its matmul computes with)."""
    w = module.weight
    if not is_quantized(module):
        return w
    import bitsandbytes.functional as bnbf

    if type(w).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(w.data, w.quant_state)
    # LLM.int8(): int8 rows and their absmax scales (SCB)
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    return w.data.float() * (scb.float()[:, None] / 127.0)
