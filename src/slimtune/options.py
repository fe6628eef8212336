"""YAML config files for the CLI: the same option names as the flags, flags win."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
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
        raise UserInputError(
            f"{path}: expected a mapping of option: value, got {type(data).__name__}"
        )
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


_KIND = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


def _coerce(value: Any, kind: Any) -> tuple[bool, Any]:
    """(fits, value) for one annotation; numeric strings fit float (YAML 1.1 reads ``1e-3``
    as a string), a bool never fits a number (``True`` is an int to Python, not to a user)."""
    if kind is Any:
        return True, value
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for a in args:
            if a is not type(None):
                ok, v = _coerce(value, a)
                if ok:
                    return True, v
        return False, value
    if origin is typing.Literal:  # e.g. lr: "auto"
        return value in args, value
    if origin is not None:  # dict[str, Any], list[str]
        if not isinstance(value, origin):
            return False, value
        if origin is list and args:
            items = [_coerce(v, args[0]) for v in value]
            return all(ok for ok, _ in items), [v for _, v in items]
        return True, value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, value
        # numbers.Real/Integral: numpy's scalars too (made plain, for JSON and the identity)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False, value
        return True, float(value)
    if kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return True, int(value)
        return False, value
    if kind is str and isinstance(value, os.PathLike):  # the Python API's Path objects
        return True, os.fspath(value)
    return isinstance(value, kind), value


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(kind))
    names = [_describe(a) for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(names)
    return _KIND.get(typing.get_origin(kind) or kind, str(kind))


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against the annotations of dataclass ``cls``'s fields.

    Returns them with numeric strings turned into floats; anything else of the wrong type,
    and any non-finite number, is a :class:`UserInputError` naming ``where`` and the field.
    """
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        ok, value = _coerce(values[f.name], hints[f.name])
        if not ok:
            raise UserInputError(
                f"{where}: field {f.name!r} must be "
                f"{_describe(hints[f.name])}, got {values[f.name]!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{where}: field {f.name!r} must be a finite number, got {value}")
        out[f.name] = value
    return out


def parse_size(text: str | int | float | None) -> int | None:
    """'6GiB', '512MB', '2.5G', 1000 -> bytes: at least one, and finite (0 would mean no
    budget, nan a crash)."""
    if text is None:
        return None
    s = str(text).strip().replace(" ", "")
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1024**3,
        "t": 1000**4,
        "tb": 1000**4,
        "tib": 1024**4,
    }
    num = s.rstrip("BbKkMmGgTtIi")
    unit = s[len(num) :].lower()
    try:
        value = float(num) * units.get(unit, 0)
    except ValueError:
        value = 0.0
    if isinstance(text, bool) or not math.isfinite(value) or value < 1:
        raise UserInputError(
            f"cannot read memory size {text!r}; write a size of at least a byte, e.g. 6GiB, "
            "800MB, 2G"
        )
    return int(value)


def parse_duration(text: str | float | None) -> float | None:
    """'1.5s', '800ms', '2m', 3 -> seconds: more than none, and finite."""
    if text is None:
        return None
    s = str(text).strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("", 1.0)):
        if s.endswith(suffix):
            try:
                value = float(s[: len(s) - len(suffix)] if suffix else s)
            except ValueError:
                break
            if value > 0 and math.isfinite(value) and not isinstance(text, bool):
                return value * scale
            break
    raise UserInputError(
        f"cannot read duration {text!r}; write a time over zero, e.g. 1.5s, 800ms, 2m"
    )
