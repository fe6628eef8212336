"""LoRA through ``peft``: its modules, its training, its file format, its attaching.

The delta folder holds peft's own ``adapter_model.safetensors`` + ``adapter_config.json``,
so ``peft.PeftModel.from_pretrained(base, delta_folder)`` loads it as it is.
:func:`attach_peft` attaches any peft-format delta (lora, dora, shira, rosa's LoRA part).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DeltaError, UserInputError
from ..model.anatomy import decoder_layers, target_module_names
from .base import Attachment, Method, MethodConfig, option, register_method
from .lora_fused import fused_lora

# Files peft's adapter weights may be in; one of them must be in a peft-format delta.
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoraOptions(MethodConfig):
    r: int = option(8, flag="lora-r", help="LoRA rank", sweep=True)
    alpha: float = option(16.0, flag="lora-alpha", help="LoRA alpha")
    dropout: float = option(0.05, flag="lora-dropout", help="LoRA dropout")
    # Short names of the linear modules to adapt; None = every linear layer in the blocks.
    target_modules: list[str] | None = option(
        None,
        flag="lora-targets",
        help="linear modules to adapt, comma-separated short names; default: every "
        "linear layer in the blocks",
    )
    # Keep adapters in the base dtype (bf16 on GPU) instead of peft's fp32 upcast: faster, smaller.
    adapter_dtype_follows_base: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserInputError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"lora dropout must be in [0, 1), got {self.dropout}")


def attach_peft(
    model: nn.Module, folder: Path, merge: bool, files: dict[str, str] | None = None
) -> Attachment:
    """Attach the peft adapter in ``folder`` (``files``: peft's file name -> ours, where a
    delta keeps them under other names).

    Unmerged, the base weights are never written and undo is peft's ``unload()``. Merged,
    the touched weights are copied first, so undo restores them exactly rather than
    subtracting ``B @ A`` again in floating point.
    """
    from peft import PeftModel

    from ..delta.peft_files import (
        PEFT_CONFIG,
        adapter_tensor_names,
        read_config,
        refuse_irremovable,
    )
    from ..model.anatomy import canonical_name

    with tempfile.TemporaryDirectory(prefix="slimtune-peft-") as view:
        if files:  # a folder where peft finds the files under the names it looks for
            for peft_name, ours in files.items():
                src = (folder / ours).resolve()
                try:
                    os.symlink(src, Path(view) / peft_name)
                except OSError:
                    shutil.copyfile(src, Path(view) / peft_name)
        where = Path(view) if files else folder
        # before peft wraps anything: unload() would not take such an adapter off exactly
        config = read_config(where / PEFT_CONFIG)
        refuse_irremovable(config, adapter_tensor_names(where), folder)
        try:
            wrapped = PeftModel.from_pretrained(model, str(where))
        except Exception as e:
            raise DeltaError(f"{folder}: peft could not load the adapter ({e})") from e
    if not merge:
        return Attachment(wrapped, False, lambda: wrapped.unload())
    touched = {
        canonical_name(n): m.base_layer.weight.detach().clone()
        for n, m in wrapped.named_modules()
        if hasattr(m, "base_layer") and hasattr(m.base_layer, "weight")
    }
    plain = wrapped.merge_and_unload()

    def restore() -> nn.Module:
        # every adapted module by its plain name: linear layers, and embeddings too
        modules = {canonical_name(n): m for n, m in plain.named_modules()}
        with torch.no_grad():
            for name, w in touched.items():
                modules[name].weight.copy_(w)
        return plain

    return Attachment(plain, True, restore)


class PeftAdapterMethod(Method):
    """A method whose delta folder is peft's own adapter format: peft saves it, and
    :func:`attach_peft` puts it on a base (unmerged, or merged with an exact undo)."""

    peft_format = True
    delta_files = PEFT_WEIGHT_FILES

    def save(self, model: nn.Module, folder: Path) -> None:
        # the tensors as the model holds them now, not its state_dict(): under FSDP2
        # (weights gathered for the write) state_dict() hands back this process' shards
        state = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        # the PeftModel that prepare returned; nn.Module's __getattr__ types it Tensor | Module
        model.save_pretrained(str(folder), state_dict=state)  # type: ignore[operator]

    @classmethod
    def attach(
        cls, model: nn.Module, folder: Path, manifest: dict[str, Any], *, merge: bool
    ) -> Attachment:
        return attach_peft(model, folder, merge)

    @contextlib.contextmanager
    def compute_context(self, model: nn.Module) -> Iterator[None]:
        """Under autocast: the adapters read the layer's bf16 input as it is (peft would copy
        every adapted layer's input to the adapters' fp32: one more activation per layer,
        saved for backward, about a third of a bf16 step's time and memory), and LoRA's add
        runs inside the GEMMs (``lora_fused``). The fp32 adapter weights stay the
        optimizer's master copy; their bf16 copies are made once per optimizer step."""
        with _no_input_casting(model), fused_lora(model):
            yield


@contextlib.contextmanager
def _no_input_casting(model: nn.Module) -> Iterator[None]:
    """peft's ``disable_input_dtype_casting`` for the tuner layers that have the switch.
    peft's own helper reads it on every tuner layer and raises on those without it (SHiRA's,
    so a SHiRA run under autocast failed); peft < 0.15 has none, and the fp32 copies stay."""
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m.cast_input_dtype_enabled = value


@register_method
class LoraMethod(PeftAdapterMethod):
    name = "lora"
    config_class = LoraOptions
    config: LoraOptions
    default_lr = 1e-3  # benchmarks/lr_sweep.py (BENCHMARKS.md)
    peft_type = "LORA"
    shardable = True
    mixes_in_batch = True

    def peft_config(self, model: nn.Module, layers: list[int]):
        from peft import LoraConfig

        cfg: LoraOptions = self.config
        targets = target_module_names(model, cfg.target_modules, "lora")
        n = len(decoder_layers(model))
        return LoraConfig(
            # peft annotates lora_alpha as int but only divides by it: a float alpha is kept
            r=cfg.r,
            lora_alpha=cfg.alpha,  # type: ignore[arg-type]
            lora_dropout=cfg.dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
            layers_to_transform=None if list(layers) == list(range(n)) else list(layers),
        )

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        from peft import get_peft_model

        if not layers:
            raise UserInputError("lora: no layer left to adapt (everything is frozen)")
        return get_peft_model(
            model,
            self.peft_config(model, layers),
            autocast_adapter_dtype=not self.config.adapter_dtype_follows_base,
        )

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        targets = config.get("target_modules")
        return {
            "r": int(config.get("r", 8)),
            "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0),
            "target_modules": sorted(targets) if isinstance(targets, list) else None,
        }
