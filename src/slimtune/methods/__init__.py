"""Fine-tuning methods, by name. Each module holds one method's math and its delta I/O."""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import Method, MethodConfig
from .experts import ExpertsMethod, ExpertsOptions
from .full import FullMethod
from .lora import LoraMethod, LoraOptions
from .rosa import RosaMethod, RosaOptions
from .shira import ShiraMethod
from .sparse import SparseMethod, SparseOptions

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (FullMethod, LoraMethod, SparseMethod, RosaMethod, ShiraMethod,
                        ExpertsMethod)}


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](options or {})


__all__ = ["METHODS", "ExpertsMethod", "ExpertsOptions", "FullMethod", "LoraMethod", "LoraOptions", "Method", "MethodConfig",
           "RosaMethod", "RosaOptions", "ShiraMethod", "SparseMethod", "SparseOptions",
           "get_method"]
