"""LoRA through ``peft``: its modules, its training, its file format.

The delta folder holds peft's own ``adapter_model.safetensors`` + ``adapter_config.json``,
so ``peft.PeftModel.from_pretrained(base, delta_folder)`` loads it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UserInputError
from ..models import decoder_layers
from .base import Method, MethodConfig


@dataclass
class LoraOptions(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # Short names of the linear modules to adapt; None = every linear layer in the blocks.
    target_modules: list[str] | None = None
    # Keep adapters in the base dtype (bf16 on GPU) instead of peft's fp32 upcast: faster, smaller.
    adapter_dtype_follows_base: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserInputError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"lora dropout must be in [0, 1), got {self.dropout}")


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the ``nn.Linear`` modules inside a decoder layer (q_proj, up_proj, ...)."""
    layer = decoder_layers(model)[0]
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear)})


def target_module_names(model: nn.Module, wanted: list[str] | None, method: str) -> list[str]:
    """``wanted`` (default: every linear of the blocks), checked against the model."""
    available = linear_module_names(model)
    missing = sorted(set(wanted or ()) - set(available))
    if missing:
        raise UserInputError(f"{method} target_modules {missing} are not linear modules of "
                             f"this model's layers; available: {available}")
    return list(wanted or available)


class LoraMethod(Method):
    name = "lora"
    config_class = LoraOptions

    def peft_config(self, model: nn.Module, layers: list[int]):
        from peft import LoraConfig

        cfg: LoraOptions = self.config
        targets = target_module_names(model, cfg.target_modules, "lora")
        n = len(decoder_layers(model))
        return LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=list(targets), task_type="CAUSAL_LM",
            layers_to_transform=None if list(layers) == list(range(n)) else list(layers),
        )

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        from peft import get_peft_model

        if not layers:
            raise UserInputError("lora: no layer left to adapt (everything is frozen)")
        return get_peft_model(model, self.peft_config(model, layers),
                              autocast_adapter_dtype=not self.config.adapter_dtype_follows_base)

    def save(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(str(folder))
