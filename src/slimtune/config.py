"""YAML config files for the CLI: the same option names as the flags, flags win."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserInputError


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a mapping of options; dashes in keys become underscores."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise UserInputError(f"{where}: invalid YAML ({problem})") from e
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path}: not UTF-8 text") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of option: value, "
                             f"got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_key_values(items: list[str], where: str = "--option") -> dict[str, Any]:
    """``["r=8", "target_modules=[q_proj,v_proj]"]`` -> ``{"r": 8, ...}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserInputError(f"{where} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserInputError(f"{where} {item!r}: cannot parse the value") from e
    return out
