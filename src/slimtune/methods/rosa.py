"""Robust sparse adapters (RoSA-style): a LoRA part plus an importance-masked sparse part on
the same weights, trained together.

The sparse entries are chosen on the plain model (importance from calibration batches, as
in :mod:`.sparse`), then LoRA adapters are added through ``peft`` and the sparse deltas are
attached to the adapted layers' base weights. A forward pass computes
``(W + S) x + B A x * alpha / r``.

Regulariser, for stability: decoupled weight decay towards zero on the whole delta (the
LoRA factors and the sparse values, ``delta_weight_decay``, default 0.01; AdamW's decay of
a parameter that *is* the delta pulls the delta, not the base, towards zero). The base is
untouched.

The delta folder holds ``sparse.safetensors`` and the LoRA part in peft's format under names
peft does not look for (:data:`LORA_FILES`): plain ``PeftModel.from_pretrained`` must refuse
the folder rather than load it without its sparse part (outputs then differ silently).
Deltas of format version 1 kept the LoRA part under peft's own names; they still load.
Applying it merges the sparse part into the base weights and attaches the LoRA part with
peft; removing the sparse part restores the base bit for bit. Having no place in peft's
format for its sparse part, it does not export to peft.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from .base import Attachment, Method, MethodConfig, option, register_method
from .importance import SCORERS, SELECTIONS
from .lora import LoraMethod, attach_peft
from .sparse import (
    SPARSE_FILE,
    STRUCTURE_HELP,
    SparseMethod,
    check_regrow_base,
    check_structure,
    save_sparse,
)

# peft's file name -> the name the LoRA part of a rosa delta has.
LORA_FILES = {
    "adapter_config.json": "lora_adapter_config.json",
    "adapter_model.safetensors": "lora_adapter_model.safetensors",
}


@dataclass
class RosaOptions(MethodConfig):
    r: int = option(8, flag="lora-r", help="LoRA rank", sweep=True)
    alpha: float = option(16.0, flag="lora-alpha", help="LoRA alpha")
    dropout: float = option(0.05, flag="lora-dropout", help="LoRA dropout")
    target_modules: list[str] | None = option(
        None,
        flag="lora-targets",
        help="linear modules to adapt, comma-separated short names; default: every "
        "linear layer in the blocks",
    )
    density: float = option(0.005, help="share of each weight to train", sweep=True)
    importance: str = option("fisher", help="importance scorer: fisher, grad, activation or random")
    selection: str = option("per_tensor", help="per_tensor or global")
    structure: str = option("entries", help=STRUCTURE_HELP)
    calibration_batches: int = 8
    regrow_every: int = option(0, help="drop-and-regrow every N steps; 0: off")
    regrow_fraction: float = 0.1
    seed: int = 0
    delta_weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserInputError(f"rosa r must be >= 1, got {self.r}")
        if not 0.0 < self.density < 1.0:
            raise UserInputError(f"density must be in (0, 1), got {self.density}")
        if self.importance not in SCORERS or self.selection not in SELECTIONS:
            raise UserInputError(
                f"importance must be one of {SCORERS}, selection one of {SELECTIONS}"
            )
        if self.delta_weight_decay < 0:
            raise UserInputError("delta_weight_decay must be >= 0")
        check_structure(self.structure, self.regrow_every)

    def lora(self) -> dict:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
        }

    def sparse(self) -> dict:
        keys = (
            "density",
            "importance",
            "selection",
            "structure",
            "calibration_batches",
            "regrow_every",
            "regrow_fraction",
            "seed",
            "target_modules",
        )
        return {k: getattr(self, k) for k in keys}


@register_method
class RosaMethod(Method):
    name = "rosa"
    config_class = RosaOptions
    config: RosaOptions
    default_lr = 1e-3  # benchmarks/lr_sweep.py (BENCHMARKS.md), on SmolLM2-135M
    lr_weight_exponent = 0.7  # training/lr_scale.py
    why_not_peft = "its sparse part has no place in peft's format"
    peft_part = LORA_FILES
    delta_files = (SPARSE_FILE,)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.lora = LoraMethod(self.config.lora())
        self.sparse = SparseMethod(self.config.sparse())

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        if not layers:
            raise UserInputError("rosa: no layer left to train (everything is frozen)")
        check_regrow_base(model, self.config.regrow_every)
        model.requires_grad_(False)
        self.sparse.progress = self.progress
        chosen = self.sparse.choose(model, layers, batches)
        wrapped = self.lora.prepare(model, layers)
        self.sparse.attach_chosen(wrapped, chosen)
        return wrapped

    def param_groups(self, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
        return [{"params": params, "weight_decay": self.config.delta_weight_decay}]

    def extra_state(self, model: nn.Module) -> dict:
        return self.sparse.extra_state(model)

    def state_dict(self, model: nn.Module) -> dict:
        return self.sparse.state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        self.sparse.load_state_dict(model, state)

    def on_step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.sparse.run_steps = self.run_steps
        self.sparse.on_step_end(model, optimizer, step)

    def compute_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.lora.compute_context(model)  # the LoRA part's bf16 compute

    def save(self, model: nn.Module, folder: Path) -> None:
        self.lora.save(model, folder)
        for peft_name, ours in LORA_FILES.items():
            (folder / peft_name).rename(folder / ours)
        save_sparse(model, folder / SPARSE_FILE, {"importance": self.config.importance})

    @classmethod
    def merge_besides_peft(cls, model: nn.Module, folder: Path, manifest: dict[str, Any]) -> None:
        SparseMethod.attach(model, folder, manifest, merge=True)

    @classmethod
    def attach(
        cls, model: nn.Module, folder: Path, manifest: dict[str, Any], *, merge: bool
    ) -> Attachment:
        """The sparse part as :class:`SparseMethod` does, then the LoRA part through peft
        (shown to peft under its own names; deltas of format version 1 used those)."""
        sparse = SparseMethod.attach(model, folder, manifest, merge=merge)
        ours = all(name in manifest["files"] for name in LORA_FILES.values())
        try:
            lora = attach_peft(model, folder, merge, LORA_FILES if ours else None)
        except Exception:
            sparse.undo()
            raise

        def undo() -> nn.Module | None:
            base = lora.undo()
            sparse.undo()
            return base

        return Attachment(lora.model, lora.merged, undo)
