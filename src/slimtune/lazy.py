"""A package's public names, imported on first use (PEP 562).

``import slimtune`` or ``slimtune.delta`` would otherwise import torch, transformers and
peft (about 3 s), which the store's index commands (``slimtune delta list``, ``tag``,
``rollback``, ``split``) never use: they read an SQLite index and some JSON.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def exports(module: str, where: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """The ``__getattr__`` and ``__dir__`` of ``module`` (a package or a module): each name
    in ``where`` comes from the module named there (relative, as in an import statement in
    ``module``), imported when the name is first read, then kept on ``module``. Any other
    name of a package is its submodule, as after an eager import (``slimtune.delta.store``)."""

    def __getattr__(name: str) -> Any:
        this = sys.modules[module]
        is_package = "__path__" in vars(this)  # hasattr would call this function again
        if name not in where:
            if is_package and not name.startswith("__"):
                try:
                    return importlib.import_module(f".{name}", module)
                except ModuleNotFoundError as e:
                    if e.name != f"{module}.{name}":
                        raise  # the submodule exists, something it imports does not
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        anchor = module if is_package else module.rpartition(".")[0]
        try:
            source = importlib.import_module(where[name], anchor)
        except AttributeError as e:  # not "no such name here": an import inside failed
            raise ImportError(f"importing {name!r} from {module}{where[name]}: {e}") from e
        value = getattr(source, name)
        setattr(this, name, value)
        return value

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[module])) | set(where))

    return __getattr__, __dir__
