"""Fused GPU kernels from a maintained library, on by default on CUDA where installed.

`Liger <https://github.com/linkedin/Liger-Kernel>`_ (``pip install 'slimtune[gpu]'``)
gives Triton kernels for RMSNorm, SwiGLU and RoPE, patched onto the model instance, and a
fused linear cross-entropy that the training loss uses on CUDA. Without it (or on CPU, or
for an architecture Liger does not cover) the same code runs on torch's own operations,
slower, and says so once.

Attention on CUDA leaves out cuDNN's SDPA kernel (:func:`choose_attention`): its host
time per call, not the GPU, set the pace of a small model's step.

Liger's patch is process-wide in part: besides the model instance's modules it replaces the
architecture's rotary function (and, depending on the architecture, its norm and MLP classes)
in its transformers module, so models of that architecture built later in the process get
them too.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from ..errors import UserInputError
from ..log import info
from .anatomy import base_model

# Architectures whose Liger patch trains but breaks what is generated after: Gemma 3 270M,
# LoRA on support_extract, Liger 0.8.5, transformers 5.24, --lr auto, 3 seeds at each of
# three cuts: with the kernels (one H200) eval loss 0.05-0.07 but 3-9% exact match; without
# them (one H100, the same command) 81-90% (BENCHMARKS.md, SALF at --lr auto). Which kernel
# is not isolated, so none of them is applied; the fused loss, a separate switch, is
# neither implicated nor cleared.
UNSAFE = frozenset({"gemma3_text", "gemma3"})
UNSAFE_REASON = "with Liger's Gemma 3 kernels, generation after training broke in our runs"

# "auto": Liger where it runs (CUDA, installed, architecture covered); "off": torch only.
# SLIMTUNE_KERNELS=off turns them off for a process (e.g. to compare).
MODES = ("auto", "off")


def mode() -> str:
    value = os.environ.get("SLIMTUNE_KERNELS", "auto")
    if value not in MODES:
        raise UserInputError(f"SLIMTUNE_KERNELS={value!r}: use one of {', '.join(MODES)}")
    return value


# Attention on CUDA (SDPA). torch prefers cuDNN's attention on Hopper GPUs, which builds an
# execution graph per input shape; in a profile of the default model's training on real data
# (batches of varying width) its host time was 1.5-2.9 ms a call, 23-49% of the step's host
# time, and without it the step was 1.55-2.70x faster (BENCHMARKS.md, where a small model's
# step goes; benchmarks/gpu_attention.sh). "auto": flash and memory-
# efficient attention only (torch's math as the fallback); "torch": torch's own order.
ATTENTION_MODES = ("auto", "torch")


def choose_attention(device: torch.device | str) -> bool:
    """Take cuDNN's attention out of torch's SDPA choice for this process when ``device`` is
    CUDA (``SLIMTUNE_ATTENTION=torch`` leaves it); returns whether it did. Process-wide, as
    torch's switch is: every model the process runs afterwards attends the same way."""
    value = os.environ.get("SLIMTUNE_ATTENTION", "auto")
    if value not in ATTENTION_MODES:
        raise UserInputError(
            f"SLIMTUNE_ATTENTION={value!r}: use one of {', '.join(ATTENTION_MODES)}"
        )
    if value == "torch" or torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    _say_once(
        "attention: flash / memory-efficient SDPA, cuDNN's left out for this process "
        "(SLIMTUNE_ATTENTION=torch keeps torch's choice)"
    )
    return True


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in: autocast's where it is on, else ``t``'s own (for
    hand-written ops that cast explicitly, as autocast would)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


@functools.cache
def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


@functools.cache
def _say_once(message: str) -> None:
    info(message)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(base_model(model), "config", None), "model_type", None)


def _supported_type(model: nn.Module) -> str | None:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = _model_type(model)
    return model_type if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN else None


def apply_fused_kernels(
    model: nn.Module, device: torch.device | str, *, elementwise: bool = True
) -> list[str]:
    """Patch Liger's RMSNorm/SwiGLU/RoPE kernels onto ``model`` when it trains on CUDA;
    returns the kernels applied (empty when none). Call before a method wraps the model.
    ``elementwise=False`` (``--compile``: inductor fuses those itself) patches none; the
    loss still takes Liger's fused linear cross-entropy."""
    # mode() first: a bad SLIMTUNE_KERNELS fails on CPU too
    if mode() == "off" or torch.device(device).type != "cuda" or not elementwise:
        return []
    if not liger_installed():
        _say_once(
            "fused GPU kernels off: Liger is not installed (pip install 'slimtune[gpu]'); "
            "training runs on torch's own RMSNorm/SwiGLU/RoPE and chunked loss"
        )
        return []
    if (arch := _model_type(model)) in UNSAFE:
        _say_once(f"fused GPU kernels off for {arch}: {UNSAFE_REASON} (BENCHMARKS.md)")
        return []
    model_type = _supported_type(model)
    if model_type is None:
        _say_once(f"fused GPU kernels off: Liger has none for {type(base_model(model)).__name__}")
        return []
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=base_model(model),
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return ["rms_norm", "swiglu", "rope"]


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """``sum_i CE(hidden_i @ weight.T, targets_i)`` through Liger's fused kernel on CUDA,
    or None where it does not run (the caller falls back to its chunked loss). A head that
    trains (full fine-tuning) keeps the chunked loss: it sums the head's gradient in fp32,
    Liger's in the compute dtype."""
    if not hidden.is_cuda or weight.requires_grad or mode() == "off" or not liger_installed():
        return None
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = compute_dtype(hidden)
    with torch.autocast("cuda", enabled=False):
        return liger_fused_linear_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, reduction="sum"
        ).float()
