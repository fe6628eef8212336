"""A delta on disk: the method's tensors plus ``manifest.json``.

The manifest says what the delta is (method and options, the layers it touches), what it
belongs to (the base model's fingerprint), where it came from (dataset fingerprint,
training config, library versions, time) and how it did (metrics). It also lists every
file with its SHA-256, so a flipped byte is found before the delta is applied.
The folder is written to a temporary name and renamed into place, manifest last.
"""

from __future__ import annotations

import json
import platform
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DeltaError
from ..fileio import atomic_dir, sha256_file, write_json
from .manifest import BaseInfo, FileEntry, Manifest, check_fields, conforms, describe

FORMAT = "slimtune-delta"
FORMAT_VERSION = 2  # 2: a rosa delta keeps its LoRA part under its own names (1 still reads)
MANIFEST = "manifest.json"

if TYPE_CHECKING:  # reading and checking a delta needs no torch (`slimtune delta list` starts fast)
    from torch import nn

    from ..methods import Method


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from ..version import __version__

    return {
        "slimtune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def save_delta(
    folder: str | Path,
    method: Method,
    model: nn.Module,
    *,
    base: dict[str, Any],
    layers: list[int],
    extra: dict[str, Any] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Write ``method``'s trained state from ``model`` as a delta folder; return the manifest."""
    folder = Path(folder)
    with atomic_dir(folder, replace=replace) as tmp:
        method.save(model, tmp)
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            method=method.name,
            method_config=method.config.to_dict(),
            mergeable=method.mergeable,
            layers=list(layers),
            base=typing.cast(BaseInfo, base),
            versions={**library_versions()},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=typing.cast(dict[str, FileEntry], files),
        )
        manifest.update(extra or {})
        written = manifest.to_dict()
        check_fields(written, folder / MANIFEST)  # what is written must read back
        write_json(tmp / MANIFEST, written)
    return written


def _tensor_files(method: str) -> tuple[str, ...]:
    """The files a delta of ``method`` cannot be applied without (one of them suffices),
    as the method declares them; none for a method this slimtune does not know."""
    from ..methods import METHODS

    cls = METHODS.get(method)
    return cls.delta_files if cls is not None else ()


def _check_fields(manifest: dict[str, Any], path: Path, method_files: bool = True) -> None:
    """Field types the store and apply rely on (read off :class:`Manifest`), and the files
    the method cannot be applied without: a malformed manifest is named, not a crash."""
    check_fields(manifest, path)
    if not method_files:
        return
    files = manifest["files"]
    needed = _tensor_files(manifest["method"])
    if needed and not any(n in files for n in needed):
        raise DeltaError(
            f"{path}: malformed manifest: a {manifest['method']} delta needs "
            f"{' or '.join(needed)}, which 'files' does not list"
        )


def read_manifest(folder: str | Path, *, method_files: bool = True) -> dict[str, Any]:
    """The manifest of the delta in ``folder``, its fields checked. ``method_files=False``
    leaves out the check that it lists one of its method's tensor files: the methods
    declare those, and importing them imports torch (``slimtune delta list`` and ``show``
    read manifests without it; ``verify`` and applying check it)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DeltaError(f"{folder}: no such delta folder")
    if path.is_symlink():
        raise DeltaError(f"{path}: a symbolic link; a delta holds plain files only")
    if not path.exists():
        raise DeltaError(f"{path}: missing; {folder} is not a slimtune delta")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaError(f"{path}: corrupted manifest ({e})") from e
    except RecursionError as e:
        raise DeltaError(f"{path}: corrupted manifest (nested too deeply)") from e
    except OSError as e:
        raise DeltaError(f"{path}: unreadable ({e.strerror})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DeltaError(f"{path}: not a slimtune delta manifest")
    version = manifest.get("format_version", 0)
    if not conforms(version, int):
        raise DeltaError(f"{path}: malformed manifest: 'format_version' is not {describe(int)}")
    if version > FORMAT_VERSION:
        raise DeltaError(
            f"{path}: format version {manifest['format_version']} is newer than "
            f"this slimtune reads ({FORMAT_VERSION}); upgrade slimtune"
        )
    _check_fields(manifest, path, method_files)
    return manifest


def verify_delta(folder: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every listed file's size and SHA-256, and that tensor files parse; name the
    first one that differs. Symbolic links are refused before anything is read through them."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for name, info in manifest["files"].items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise DeltaError(f"{folder / MANIFEST}: file name {name!r} escapes the delta folder")
        try:
            _verify_file(folder / name, info)
        except OSError as e:  # a name the OS refuses (too long), a file it cannot read
            raise DeltaError(f"{folder / name[:80]}: unreadable ({e.strerror})") from e
    return manifest


def _verify_file(path: Path, info: dict[str, Any]) -> None:
    """One listed file: a plain file of the recorded size and SHA-256; a tensor file parses."""
    from safetensors import safe_open

    if path.is_symlink():
        raise DeltaError(f"{path}: a symbolic link; a delta holds plain files only")
    if not path.is_file():
        raise DeltaError(f"{path}: listed in the manifest but missing")
    if path.stat().st_size != info["bytes"]:
        raise DeltaError(
            f"{path}: size {path.stat().st_size} bytes, manifest says "
            f"{info['bytes']} (truncated or replaced)"
        )
    if sha256_file(path) != info["sha256"]:
        raise DeltaError(f"{path}: checksum mismatch (corrupted)")
    if path.name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types
            raise DeltaError(f"{path}: not a valid safetensors file ({e})") from e


def delta_bytes(manifest: dict[str, Any]) -> int:
    return sum(int(f["bytes"]) for f in manifest["files"].values())


def check_base(manifest: dict[str, Any], base_fingerprint: str, where: str | Path) -> None:
    expected = manifest["base"].get("fingerprint")
    if expected != base_fingerprint:
        raise DeltaError(
            f"{where}: this delta was trained on base {manifest['base'].get('name', '?')} "
            f"({str(expected)[:19]}...), but the model given has fingerprint "
            f"{base_fingerprint[:19]}...; refusing to apply it to a different base"
        )
