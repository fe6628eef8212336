"""DoRA (weight-decomposed LoRA) through ``peft``: LoRA with ``use_dora=True``.

Each adapted weight is split into a per-output-row magnitude (trained) and a direction
(the base weight plus the LoRA update, normalised). Everything else is LoRA's: the folder is
peft's own adapter format (``PeftModel.from_pretrained`` loads it), and attaching, merging
and undoing go through :func:`~slimtune.methods.lora.attach_peft`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import register_method
from .lora import LoraMethod, LoraOptions


@dataclass
class DoraOptions(LoraOptions):
    """LoRA's options (rank, alpha, dropout, targets); DoRA adds none."""


@register_method
class DoraMethod(LoraMethod):
    name = "dora"
    config_class = DoraOptions
    quantizations = ("nf4",)
    why_not_quantized = "peft's DoRA fails on bitsandbytes' 8-bit layers; use --quantize nf4"
    shardable = False
    why_not_sharded = "DoRA under FSDP2 is not tested yet (lora is)"
    mixes_in_batch = False  # peft refuses adapter_names with DoRA layers

    def peft_config(self, model: nn.Module, layers: list[int]):
        cfg = super().peft_config(model, layers)
        cfg.use_dora = True
        return cfg

    @classmethod
    def imports_peft(cls, config: dict[str, Any]) -> bool:
        """A LoRA adapter trained with ``use_dora`` (plain LoRA ones stay lora)."""
        return super().imports_peft(config) and bool(config.get("use_dora"))
