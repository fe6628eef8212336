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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DeltaError
from ..fileio import atomic_dir, sha256_file, write_json
from ..methods import Method

FORMAT = "slimtune-delta"
FORMAT_VERSION = 2  # 2: a rosa delta keeps its LoRA part under its own names (1 still reads)
MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from ..version import __version__

    return {"slimtune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def save_delta(folder: str | Path, method: Method, model: nn.Module, *,
               base: dict[str, Any], layers: list[int], extra: dict[str, Any] | None = None,
               replace: bool = False) -> dict[str, Any]:
    """Write ``method``'s trained state from ``model`` as a delta folder; return the manifest."""
    folder = Path(folder)
    with atomic_dir(folder, replace=replace) as tmp:
        method.save(model, tmp)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method.name,
            "method_config": method.config.to_dict(),
            "mergeable": method.mergeable,
            "layers": list(layers),
            "base": base,
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _tensor_files(method: str) -> tuple[str, ...]:
    """The files a delta of ``method`` cannot be applied without (one of them suffices),
    as the method declares them; none for a method this slimtune does not know."""
    from ..methods import METHODS

    cls = METHODS.get(method)
    return cls.delta_files if cls is not None else ()


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Field types the store and apply rely on: a malformed manifest is named, not a crash."""
    def bad(what: str) -> DeltaError:
        return DeltaError(f"{path}: malformed manifest: {what}")

    for key in ("method", "method_config", "base", "files", "layers"):
        if key not in manifest:
            raise DeltaError(f"{path}: manifest lacks field '{key}'")
    if not isinstance(manifest["method"], str):
        raise bad("'method' is not a string")
    if not isinstance(manifest["method_config"], dict):
        raise bad("'method_config' is not an object")
    base = manifest["base"]
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise bad("'base' is not an object with a 'fingerprint' string")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise bad("'files' is not a non-empty object of file name -> {sha256, bytes}")
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and type(info.get("bytes")) is int and info["bytes"] >= 0):
            raise bad(f"files[{name!r}] needs 'sha256' (a string) and 'bytes' (an integer)")
    needed = _tensor_files(manifest["method"])
    if needed and not any(n in files for n in needed):
        raise bad(f"a {manifest['method']} delta needs {' or '.join(needed)}, which 'files' "
                  "does not list")


def read_manifest(folder: str | Path) -> dict[str, Any]:
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
    if type(version) is not int:
        raise DeltaError(f"{path}: malformed manifest: 'format_version' is not an integer")
    if version > FORMAT_VERSION:
        raise DeltaError(f"{path}: format version {manifest['format_version']} is newer than "
                         f"this slimtune reads ({FORMAT_VERSION}); upgrade slimtune")
    _check_fields(manifest, path)
    return manifest


def verify_delta(folder: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every listed file's size and SHA-256, and that tensor files parse; name the
    first one that differs. Symbolic links are refused before anything is read through them."""
    from safetensors import safe_open

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for name, info in manifest["files"].items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise DeltaError(f"{folder / MANIFEST}: file name {name!r} escapes the delta folder")
        path = folder / name
        if path.is_symlink():
            raise DeltaError(f"{path}: a symbolic link; a delta holds plain files only")
        if not path.is_file():
            raise DeltaError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != info["bytes"]:
            raise DeltaError(f"{path}: size {path.stat().st_size} bytes, manifest says "
                             f"{info['bytes']} (truncated or replaced)")
        if sha256_file(path) != info["sha256"]:
            raise DeltaError(f"{path}: checksum mismatch (corrupted)")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors raises its own error types
                raise DeltaError(f"{path}: not a valid safetensors file ({e})") from e
    return manifest


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
