"""Fine-tuning methods, by name. Each module holds one method's math, its delta I/O and how
its delta attaches to a model; ``@register_method`` on its class puts it in :data:`METHODS`.

Adding a method: one module here (or one package, as ``experts/``) whose class is decorated
with ``@register_method``, plus its import line below (the registry line).
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import (
    METHODS,
    SWEEP,
    Attachment,
    Method,
    MethodConfig,
    option,
    register_method,
    unregister_method,
)

# The registry lines: importing a module registers its method.
from .dora import DoraMethod, DoraOptions
from .experts import ExpertsMethod, ExpertsOptions
from .full import FullMethod
from .lora import LoraMethod, LoraOptions
from .rosa import RosaMethod, RosaOptions
from .shira import ShiraMethod
from .sparse import SparseMethod, SparseOptions


def method_class(name: str) -> type[Method]:
    """The registered method class ``name`` (what it declares, without configuring it)."""
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """A configured instance of the registered method ``name``."""
    return method_class(name)(options or {})


__all__ = [
    "METHODS",
    "SWEEP",
    "Attachment",
    "DoraMethod",
    "DoraOptions",
    "ExpertsMethod",
    "ExpertsOptions",
    "FullMethod",
    "LoraMethod",
    "LoraOptions",
    "Method",
    "MethodConfig",
    "RosaMethod",
    "RosaOptions",
    "ShiraMethod",
    "SparseMethod",
    "SparseOptions",
    "get_method",
    "method_class",
    "option",
    "register_method",
    "unregister_method",
]
