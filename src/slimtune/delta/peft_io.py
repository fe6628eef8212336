"""peft adapter folders into and out of the store.

``export`` copies a version whose files already are peft's format (its method says
``peft_format``: lora, dora, shira). ``import`` asks the methods which one an adapter
becomes (:meth:`Method.imports_peft`) and wraps a peft adapter folder in a slimtune manifest, but only after attaching it to the base
it names: an adapter whose tensors do not fit that base is refused here, with the tensor
named, rather than stored under the base's fingerprint and failing at every later use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DeltaError, UserInputError
from .peft_files import PEFT_CONFIG, PEFT_WEIGHTS, first_line, read_config, refuse_irremovable

if TYPE_CHECKING:
    from ..methods import Method

PEFT_BIN = "adapter_model.bin"


def exportable() -> list[str]:
    """The registered methods whose delta folder is exactly a peft adapter folder."""
    from ..methods import METHODS

    return [name for name, cls in METHODS.items() if cls.peft_format]


def importable() -> list[str]:
    """The peft types some registered method imports."""
    from ..methods import METHODS

    return sorted({cls.peft_type for cls in METHODS.values() if cls.peft_format and cls.peft_type})


def importer(config: dict[str, Any]) -> type[Method] | None:
    """The registered method a peft adapter with this adapter_config.json becomes: of the
    methods that claim it (:meth:`Method.imports_peft`), the most specific (a subclass wins
    over its base, e.g. dora over lora for a ``use_dora`` adapter)."""
    from ..methods import METHODS

    claims = [cls for cls in METHODS.values() if cls.imports_peft(config)]
    specific = [c for c in claims if not any(o is not c and issubclass(o, c) for o in claims)]
    return specific[0] if specific else None


@dataclass
class Imported:
    version: Any  # the store's new Version
    model: str  # the base the adapter was checked against and fingerprinted
    adapter_base: str | None  # the adapter's own base_model_name_or_path


def export_peft(
    version, out: str | Path, *, model: str | None = None, dtype: str | None = None
) -> Path:
    """Copy a version of a peft-format method (lora, dora, shira) to ``out`` as a plain peft
    adapter folder. A delta with a peft part and a part peft cannot hold (rosa) becomes
    ``out/base`` (the base with that part merged, in ``dtype``) and ``out/adapter`` (the
    peft part, naming that base), which serving engines load as base + LoRA."""
    from ..fileio import atomic_dir
    from ..methods import METHODS
    from .format import verify_delta

    method = METHODS.get(version.method)
    if method is not None and method.peft_part:
        return _export_split(version, method, Path(out), model=model, dtype=dtype)
    if method is None or not method.peft_format:
        why = f": {method.why_not_peft}" if method is not None and method.why_not_peft else ""
        raise UserInputError(
            f"{version.id} is a {version.method} delta; only "
            f"{' and '.join(exportable())} versions export to peft{why}"
        )
    out = Path(out)
    if out.exists():
        raise UserInputError(f"{out} already exists; choose a new folder")
    verify_delta(version.path)  # peft checks nothing: a corrupted file is named here
    with atomic_dir(out) as tmp:
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copyfile(version.path / name, tmp / name)
    return out


def _export_split(
    version, method: type[Method], out: Path, *, model: str | None, dtype: str | None
) -> Path:
    from ..fileio import atomic_dir, write_json
    from ..model.loading import fingerprint
    from .apply import MERGE_DTYPES, _default_merge_dtype, load_base
    from .format import check_base, verify_delta

    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserInputError(f"dtype {dtype!r}: use one of {', '.join(MERGE_DTYPES)}")
    if out.exists():
        raise UserInputError(f"{out} already exists; choose a new folder")
    manifest = verify_delta(version.path)
    loaded = load_base(manifest, model, dtype=torch.float32)
    check_base(manifest, fingerprint(loaded.model), version.path)
    method.merge_besides_peft(loaded.model, version.path, manifest)
    dtype = dtype or _default_merge_dtype(manifest, loaded.source)[0]
    loaded.model.to(MERGE_DTYPES[dtype])
    files = manifest.get("files") or {}
    with atomic_dir(out) as tmp:
        loaded.model.save_pretrained(tmp / "base")
        loaded.tokenizer.save_pretrained(tmp / "base")
        (tmp / "adapter").mkdir()
        for peft_name, ours in method.peft_part.items():
            src = version.path / (ours if ours in files else peft_name)  # format 1: peft's
            shutil.copyfile(src, tmp / "adapter" / peft_name)
        config = json.loads((tmp / "adapter" / PEFT_CONFIG).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str((out / "base").resolve())
        write_json(tmp / "adapter" / PEFT_CONFIG, config)
    return out


def read_adapter_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors: ``adapter_model.safetensors``, else ``adapter_model.bin``
    unpickled with ``weights_only=True`` (tensors only, no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / PEFT_WEIGHTS
    try:
        if path.is_file():
            return load_file(str(path)), path
        path = folder / PEFT_BIN
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise DeltaError(f"{path}: unreadable adapter weights ({first_line(e)})") from e
    except Exception as e:  # pickle.UnpicklingError and friends of a hostile or broken .bin
        raise DeltaError(f"{path}: refused ({first_line(e)})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DeltaError(f"{path}: not a mapping of tensor names to tensors")
    # safetensors refuses tensors that share memory; each gets its own copy.
    return {str(k): v.clone().contiguous() for k, v in state.items()}, path


def _attach_checked(
    model: nn.Module,
    config_path: Path,
    state: dict[str, torch.Tensor],
    weights_path: Path,
    spec: str,
    hint: str,
) -> nn.Module:
    """``model`` with the adapter attached, after checking every tensor against the slot
    peft made for it in this model (a mismatch names the tensor, in one line, + ``hint``)."""
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    try:
        config = PeftConfig.from_pretrained(str(config_path.parent))
    except Exception as e:  # peft raises TypeError/ValueError for unknown or bad fields
        raise DeltaError(f"{config_path}: not a valid peft config ({first_line(e)})") from e
    try:
        wrapped = PeftModel(model, config)
    except Exception as e:  # e.g. target modules the model does not have
        raise DeltaError(f"{config_path}: does not fit {spec} ({first_line(e)}); {hint}") from e
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(wrapped).items()}
    for key, tensor in state.items():
        if key not in expected:
            raise DeltaError(
                f"{weights_path}: tensor {key} has no place in {spec} "
                f"(no such module or layer); {hint}"
            )
        if tuple(tensor.shape) != expected[key]:
            raise DeltaError(
                f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"{spec} needs {expected[key]}; {hint}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DeltaError(
            f"{weights_path}: lacks tensor {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + f" that the adapter's config asks for in {spec}; {hint}"
        )
    set_peft_model_state_dict(wrapped, state)
    return wrapped.eval()


def _adapted_layers(wrapped: nn.Module) -> list[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..model.anatomy import decoder_layers

    return [
        i
        for i, layer in enumerate(decoder_layers(wrapped))
        if any(isinstance(m, BaseTunerLayer) for m in layer.modules())
    ]


def import_peft(
    store, src: str | Path, *, model: str | None = None, note: str | None = None
) -> Imported:
    """Check a peft adapter folder against its base and add it to ``store``.

    The base is ``model`` when given, else the adapter's ``base_model_name_or_path``.
    """
    from ..model.anatomy import decoder_layers
    from ..model.loading import fingerprint, load_model
    from .format import save_delta

    src = Path(src)
    config_path = src / PEFT_CONFIG
    if not config_path.is_file() or not (
        (src / PEFT_WEIGHTS).is_file() or (src / PEFT_BIN).is_file()
    ):
        raise DeltaError(
            f"{src}: not a peft adapter folder (needs {PEFT_CONFIG} and "
            f"{PEFT_WEIGHTS} or {PEFT_BIN})"
        )
    cfg = read_config(config_path)
    cls = importer(cfg)
    if cls is None:
        raise DeltaError(
            f"{config_path}: peft_type is {cfg.get('peft_type')!r}; slimtune "
            f"imports {', '.join(importable())}"
        )
    adapter_base = cfg.get("base_model_name_or_path") or None
    spec = model or adapter_base
    if not spec:
        raise UserInputError(f"{config_path}: names no base_model_name_or_path; pass --model")
    state, weights_path = read_adapter_weights(src)
    refuse_irremovable(cfg, state, src)  # before any model loads
    loaded = load_model(spec)
    base = {
        "fingerprint": fingerprint(loaded.model),
        "name": loaded.name,
        "source": loaded.source,
        "architecture": type(loaded.model).__name__,
        "num_layers": len(decoder_layers(loaded.model)),
    }
    with tempfile.TemporaryDirectory(prefix="slimtune-import-") as tmp:
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        shutil.copyfile(config_path, adapter / PEFT_CONFIG)
        hint = (
            f"the adapter names base {adapter_base}"
            if adapter_base not in (None, spec)
            else "is it the adapter's base?"
        )
        wrapped = _attach_checked(
            loaded.model, adapter / PEFT_CONFIG, state, weights_path, spec, hint
        )
        method = cls(cls.options_from_peft(cfg, wrapped))
        delta = Path(tmp) / "delta"
        save_delta(
            delta,
            method,
            wrapped,
            base=base,
            layers=_adapted_layers(wrapped),
            extra={"imported_from": str(src.resolve()), "imported_base": adapter_base},
        )
        version = store.add(delta, note=note or f"imported from {src}")
    return Imported(version, spec, adapter_base)
