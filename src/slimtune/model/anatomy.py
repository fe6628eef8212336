"""Where the parts of a model are: its decoder layers, final norm, head, linear modules.

Every place that needs a part of a model asks here, so supporting another architecture
(or a wrapper such as peft's) is a change to this one module. Parts are found by shape
and by the few attribute names transformers uses, never by model class.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from ..errors import ModelLoadError, UserInputError


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap a PEFT model (its injected adapters stay in place in the base modules)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks, found by shape rather than by name.

    Works through PEFT wrappers: it is the longest ``ModuleList`` whose length equals
    ``config.num_hidden_layers``.
    """
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    best: nn.ModuleList | None = None
    for module in model.modules():
        fits = isinstance(module, nn.ModuleList) and (n is None or len(module) == n)
        if fits and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise ModelLoadError(f"{type(model).__name__}: cannot find its decoder layers")
    return best


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last decoder layer (``model.norm`` for Llama-style models)."""
    base = getattr(model, "model", None)
    for owner in (base, model):
        for attr in ("norm", "final_layernorm", "ln_f"):
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    return None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder stack, output head) if the head is a plain projection of the last hidden state."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    backbone = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Linear):
        return None
    return backbone, head


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the KV-cache argument's name in this transformers version
    (``cache`` since 5.2x, ``past_key_values`` before)."""
    return {_cache_kwarg_of(type(base_model(model))): cache}


def canonical_name(name: str) -> str:
    """A module's name in the plain base model (without PEFT's wrappers)."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer", "")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by its name in the plain base model."""
    return {canonical_name(n): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the ``nn.Linear`` modules inside a decoder layer (q_proj, up_proj, ...)."""
    layer = decoder_layers(model)[0]
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    )


def target_module_names(model: nn.Module, wanted: list[str] | None, method: str) -> list[str]:
    """``wanted`` (default: every linear of the blocks), checked against the model."""
    available = linear_module_names(model)
    missing = sorted(set(wanted or ()) - set(available))
    if missing:
        raise UserInputError(
            f"{method} target_modules {missing} are not linear modules of "
            f"this model's layers; available: {available}"
        )
    return list(wanted or available)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
