"""peft's SHiRA (sparse high-rank adapter: a random, fixed subset of each weight is trained)
as a method of its own: the in-library anchor that slimtune's importance-scored sparse
fine-tuning is compared against, at the same density.

peft sizes SHiRA by ``r``: each adapted ``m x n`` weight trains ``r * (m + n)`` entries.
``density`` is turned into the ``r`` that trains the same total number of entries over the
adapted weights. The delta folder is peft's own format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from ..model.anatomy import decoder_layers, linear_module_names
from .base import MethodConfig, option, register_method
from .lora import PeftAdapterMethod


@dataclass
class ShiraOptions(MethodConfig):
    density: float = option(0.01, help="share of each weight to train", sweep=True)
    target_modules: list[str] | None = option(
        None,
        flag="lora-targets",
        help="linear modules to adapt, comma-separated short names; default: every "
        "linear layer in the blocks",
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.density < 1.0:
            raise UserInputError(f"density must be in (0, 1), got {self.density}")


@register_method
class ShiraMethod(PeftAdapterMethod):
    name = "shira"
    config_class = ShiraOptions
    config: ShiraOptions
    default_lr = 1e-2  # benchmarks/lr_sweep.py and gpu_default_check.sh (BENCHMARKS.md)
    lr_weight_exponent = 1.3  # training/lr_scale.py
    peft_type = "SHIRA"

    def prepare(self, model: nn.Module, layers: list[int], batches=None) -> nn.Module:
        from peft import ShiraConfig, get_peft_model

        if not layers:
            raise UserInputError("shira: no layer left to train (everything is frozen)")
        cfg: ShiraOptions = self.config
        targets = cfg.target_modules or linear_module_names(model)
        all_layers = decoder_layers(model)
        shapes = [
            m.weight.shape
            for i in layers
            for n, m in all_layers[i].named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
        ]
        r = max(
            1, round(cfg.density * sum(a * b for a, b in shapes) / sum(a + b for a, b in shapes))
        )
        pattern = r".*\.(" + "|".join(map(str, layers)) + r")\..*\.(" + "|".join(targets) + r")$"
        return get_peft_model(
            model,
            ShiraConfig(r=r, target_modules=pattern, random_seed=cfg.seed, task_type="CAUSAL_LM"),
        )

    @classmethod
    def options_from_peft(cls, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """The density is what the attached adapter trains over the weights it covers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = config.get("target_modules")
        trained = sum(p.numel() for n, p in model.named_parameters() if "shira_weight" in n)
        covered = 0
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                weight = m.get_base_layer().weight
                assert isinstance(weight, torch.Tensor)
                covered += weight.numel()
        return {
            "density": trained / covered,
            "target_modules": sorted(targets) if isinstance(targets, list) else None,
            "seed": int(config.get("random_seed") or 0),
        }
