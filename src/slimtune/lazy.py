"""A package's public names, imported on first use (PEP 562).

``import slimtune`` or ``slimtune.delta`` would otherwise import torch, transformers and
peft (about 3 s), which the store's commands (``slimtune delta list``, ``tag``,
``rollback``, ``verify``) never use: they read an SQLite index and some JSON.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def exports(module: str, where: dict[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``module`` (a package or a module): each name in ``where``
    comes from the module named there (relative, as in an import statement in ``module``),
    imported when the name is first read, then kept on ``module``."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        this = sys.modules[module]
        anchor = module if hasattr(this, "__path__") else module.rpartition(".")[0]
        value = getattr(importlib.import_module(where[name], anchor), name)
        setattr(this, name, value)
        return value

    return __getattr__
