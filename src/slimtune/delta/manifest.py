"""A delta's ``manifest.json`` as one typed structure, and the checks of a read one.

The checks are read off the field types (``check_fields``), so a field is declared once:
a required field that is missing, or any field whose JSON value does not match its type,
is a :class:`DeltaError` naming the file and the field. Fields the trainer or the importer
add are optional: absent ones (``ABSENT``, distinct from a written ``null``) are not written,
and keys this slimtune does not know are kept in ``extra``, so ``from_dict``/``to_dict``
give back the object that was read. An optional field (or base key, or library version)
declared ``| None`` may be ``null``: "not recorded", as hand-edited and third-party
manifests have it and as the first reader took it; a required field stays strict.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, TypedDict, Union

from ..errors import DeltaError


class _Absent(enum.Enum):
    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent.ABSENT  # an optional field the manifest does not have (not written)


@dataclass(frozen=True)
class Min:
    """``Annotated[int, Min(0)]``: the smallest value the field accepts."""

    value: int


class FileEntry(TypedDict):
    sha256: str
    bytes: Annotated[int, Min(0)]


class _BaseRequired(TypedDict):
    fingerprint: str


class BaseInfo(_BaseRequired, total=False):
    """The base model a delta belongs to (only its fingerprint is checked on apply)."""

    name: str | None
    source: str | None
    architecture: str | None
    num_layers: int | None


@dataclass
class Manifest:
    """What a delta is, what it belongs to, where it came from and how it did."""

    format: str
    # checked in this order: the first one missing or malformed is named
    method: str
    method_config: dict[str, Any]
    base: BaseInfo
    files: dict[str, FileEntry] = field(metadata={"non_empty": True, "key": "file name"})
    layers: list[int] | None  # present, but null reads as "not recorded" (the first reader)
    format_version: int = 0  # a manifest without one is of the first format
    # optional: None (a written null) is "not recorded", ABSENT is not written
    mergeable: bool | _Absent | None = ABSENT
    versions: dict[str, str | None] | _Absent | None = ABSENT
    created: str | _Absent | None = ABSENT
    # added by training
    dataset: dict[str, Any] | _Absent | None = ABSENT
    training: dict[str, Any] | _Absent | None = ABSENT
    # the run summary (training.summary.RunSummary)
    metrics: dict[str, Any] | _Absent | None = ABSENT
    auto_freeze: dict[str, Any] | _Absent | None = ABSENT
    lr_search: dict[str, Any] | _Absent | None = ABSENT  # --lr auto's range test
    resume_changes: list[dict[str, Any]] | _Absent | None = ABSENT
    # added by importing a PEFT adapter
    imported_from: str | _Absent | None = ABSENT
    imported_base: str | _Absent | None = ABSENT
    extra: dict[str, Any] = field(default_factory=dict)  # keys this slimtune does not know

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json object (absent fields left out, ``extra``'s keys included)."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and getattr(self, f.name) is not ABSENT
        }
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | Path = "manifest") -> Manifest:
        """A manifest object, checked field by field (``where`` names it in the error)."""
        check_fields(data, where)
        names = _names()
        manifest = cls(**{k: v for k, v in data.items() if k in names})
        manifest.extra = {k: v for k, v in data.items() if k not in names}
        return manifest

    def update(self, values: Mapping[str, Any]) -> None:
        """Set the fields ``values`` names; other keys go to ``extra``."""
        names = _names()
        for key, value in values.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value


def _names() -> set[str]:
    return {f.name for f in fields(Manifest)} - {"extra"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _options(tp: Any) -> list[Any]:
    """The members of a union (``X | Y`` or ``Union``) but ABSENT's type; else ``[tp]``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [t for t in typing.get_args(tp) if t is not _Absent]
    return [tp]


def conforms(value: Any, tp: Any) -> bool:
    """Whether a JSON value matches the type ``tp`` (bool is not an int, an int is a float)."""
    options = _options(tp)
    if len(options) > 1:
        return any(conforms(value, t) for t in options)
    tp = options[0]
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is Annotated:
        inner, *marks = typing.get_args(tp)
        return conforms(value, inner) and all(value >= m.value for m in marks if isinstance(m, Min))
    if _is_typeddict(tp):
        if not isinstance(value, dict) or not tp.__required_keys__ <= value.keys():
            return False
        return all(conforms(value[k], t) for k, t in _hints(tp).items() if k in value)
    origin = typing.get_origin(tp)
    if origin is dict:
        key_t, value_t = typing.get_args(tp)
        return isinstance(value, dict) and all(
            conforms(k, key_t) and conforms(v, value_t) for k, v in value.items()
        )
    if origin is list:
        (item_t,) = typing.get_args(tp)
        return isinstance(value, list) and all(conforms(v, item_t) for v in value)
    if tp is bool:
        return type(value) is bool
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (int, float)
    return isinstance(value, tp)


_NOUNS = {
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
    list: "list",
    dict: "object",
}


def describe(tp: Any) -> str:
    """``tp`` in an error message: "a string", "an object with a 'fingerprint' string"."""
    options = [t for t in _options(tp) if t is not type(None)]
    if len(options) > 1:
        return " or ".join(describe(t) for t in options)
    tp = options[0]
    if typing.get_origin(tp) is Annotated:
        return describe(typing.get_args(tp)[0])
    if _is_typeddict(tp):
        hints = _hints(tp)
        needs = " and ".join(
            f"a '{k}' {describe(hints[k]).split(' ', 1)[1]}" for k in sorted(tp.__required_keys__)
        )
        return f"an object with {needs}"
    noun = _NOUNS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def check_fields(manifest: Mapping[str, Any], where: str | Path) -> None:
    """Refuse a manifest whose required fields are missing or whose fields have the wrong
    JSON type, naming the first such field: a malformed manifest is named, not a crash."""

    def bad(what: str) -> DeltaError:
        return DeltaError(f"{where}: malformed manifest: {what}")

    declared = [f for f in fields(Manifest) if f.name != "extra"]
    for f in declared:
        if _required(f) and f.name not in manifest:
            raise DeltaError(f"{where}: manifest lacks field '{f.name}'")
    hints = _hints(Manifest)
    for f in declared:
        if f.name not in manifest:
            continue
        value, tp = manifest[f.name], hints[f.name]
        if f.metadata.get("non_empty"):  # an object of named entries, each checked
            _key_t, entry_t = typing.get_args(tp)
            if not (isinstance(value, dict) and value):
                keys = ", ".join(_hints(entry_t))
                raise bad(
                    f"'{f.name}' is not a non-empty object of {f.metadata['key']} -> {{{keys}}}"
                )
            for name, entry in value.items():
                if not conforms(entry, entry_t):
                    needs = " and ".join(
                        f"'{k}' ({describe(t)})" for k, t in _hints(entry_t).items()
                    )
                    raise bad(f"{f.name}[{name!r}] needs {needs}")
        elif _is_typeddict(tp):
            _check_object(f.name, value, tp, bad)
        elif not conforms(value, tp):
            raise bad(f"'{f.name}' is not {describe(tp)}")


def _check_object(name: str, value: Any, tp: Any, bad: typing.Callable[[str], DeltaError]) -> None:
    """An object field (``base``): its required keys as a whole, then each other key by
    name, so a wrong-typed ``num_layers`` is named rather than the whole object."""
    hints = _hints(tp)
    if not isinstance(value, dict) or not all(
        k in value and conforms(value[k], hints[k]) for k in tp.__required_keys__
    ):
        raise bad(f"'{name}' is not {describe(tp)}")
    for key, key_t in hints.items():
        if key in value and not conforms(value[key], key_t):
            raise bad(f"'{name}.{key}' is not {describe(key_t)}")
