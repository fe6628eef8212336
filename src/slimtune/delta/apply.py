"""Apply a delta to a loaded base model, and take it off again bit for bit.

* ``full``: the trained tensors are replaced; their originals are kept to restore.
* ``sparse``: the values are scatter-added; the original entries are kept to restore.
* ``lora`` / ``shira``: attached through peft. Unmerged (the default in a live process) the
  base weights are never written, and removing is peft's ``unload()``. Merged
  (``merge=True``, e.g. to write a model folder) the touched weights are copied first, so
  removing restores them exactly rather than subtracting ``B @ A`` again in floating point.
* ``rosa``: the sparse part as above, then the LoRA part as above (its files are named so
  that plain peft refuses the folder; they are shown to peft under its own names).
* ``experts``: routed per token, so it cannot merge (the manifest says ``mergeable: false``);
  it is attached as modules, and removing it puts the original layers back.

:class:`DeltaSwitcher` keeps one base model loaded and switches deltas on it (hot swap).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import DeltaError, UserInputError
from ..methods.full import WEIGHTS_FILE
from ..methods.sparse import (
    SPARSE_FILE,
    apply_sparse,
    canonical_name,
    linear_modules,
    remove_sparse,
)
from .format import check_base, verify_delta


@dataclass
class Applied:
    model: nn.Module  # the model to run
    manifest: dict
    ref: str
    merged: bool
    _undo: list[Callable[[], nn.Module | None]] = field(default_factory=list)

    def remove(self) -> nn.Module:
        """Take the delta off; return the base model (the same weights as before, bit for bit)."""
        base = self.model
        for undo in reversed(self._undo):
            out = undo()
            if out is not None:
                base = out
        self._undo.clear()
        return base


def _peft_files(method: str, manifest: dict) -> dict[str, str]:
    """peft's file name -> the file that holds it in this delta (empty: peft's own names)."""
    from ..methods.rosa import LORA_FILES

    if method == "rosa" and all(ours in manifest["files"] for ours in LORA_FILES.values()):
        return LORA_FILES
    return {}  # lora, shira, and rosa deltas of format version 1


def _attach_peft(model: nn.Module, folder: Path, merge: bool, files: dict[str, str]
                 ) -> tuple[nn.Module, Callable]:
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="slimtune-peft-") as view:
        if files:  # a folder where peft finds the files under the names it looks for
            for peft_name, ours in files.items():
                src = (folder / ours).resolve()
                try:
                    os.symlink(src, Path(view) / peft_name)
                except OSError:
                    shutil.copyfile(src, Path(view) / peft_name)
        try:
            wrapped = PeftModel.from_pretrained(model, view if files else str(folder))
        except Exception as e:
            raise DeltaError(f"{folder}: peft could not load the adapter ({e})") from e
    if not merge:
        return wrapped, lambda: wrapped.unload()
    touched = {canonical_name(n): m.base_layer.weight.detach().clone()
               for n, m in wrapped.named_modules() if hasattr(m, "base_layer")
               and hasattr(m.base_layer, "weight")}
    plain = wrapped.merge_and_unload()

    def restore() -> nn.Module:
        modules = linear_modules(plain)
        with torch.no_grad():
            for name, w in touched.items():
                modules[name].weight.copy_(w)
        return plain

    return plain, restore


def apply_delta(model: nn.Module, folder: str | Path, base_fingerprint: str, *,
                merge: bool = False, ref: str | None = None) -> Applied:
    """Verify ``folder``, check it belongs to this base, and apply it to ``model``."""
    folder = Path(folder)
    manifest = verify_delta(folder)
    check_base(manifest, base_fingerprint, folder)
    method = manifest["method"]
    applied = Applied(model, manifest, ref or str(folder), merge)
    if method == "full":
        state = load_file(str(folder / WEIGHTS_FILE))
        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise DeltaError(f"{folder}: tensors {missing[:3]} are not in the model")
        original = {n: params[n].detach().clone() for n in state}
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise DeltaError(f"{folder}: {n} has shape {tuple(v.shape)}, the model's is "
                                     f"{tuple(params[n].shape)}")
            for n, v in state.items():
                params[n].copy_(v)

        def undo_full() -> None:
            with torch.no_grad():
                for n, v in original.items():
                    params[n].copy_(v)

        applied._undo.append(undo_full)
        applied.merged = True
    elif method == "sparse":
        apply_sparse(model, folder / SPARSE_FILE)
        applied._undo.append(lambda: remove_sparse(model))
        applied.merged = True
    elif method in ("lora", "shira", "rosa"):
        if method == "rosa":
            apply_sparse(model, folder / SPARSE_FILE)
            applied._undo.append(lambda: remove_sparse(model))
        applied.model, undo = _attach_peft(model, folder, merge, _peft_files(method, manifest))
        applied._undo.append(undo)
    elif method == "experts":
        from ..methods.experts import load_experts

        applied._undo.append(load_experts(model, folder, manifest).remove)
        applied.merged = False
    else:
        raise DeltaError(f"{folder}: unknown method {method!r}")
    return applied


def load_delta(folder: str | Path, model: nn.Module, base_fingerprint: str
               ) -> tuple[nn.Module, dict]:
    """Verify ``folder`` and attach it to the base ``model`` (unmerged where the method
    allows); return (model to run, manifest)."""
    applied = apply_delta(model, folder, base_fingerprint)
    return applied.model, applied.manifest


def recorded_base(manifest: dict) -> str:
    """The model spec (for :func:`~slimtune.models.load_model`) of the base the delta was
    trained on, as its manifest records it: ``base.source``; ``default`` for the default
    model's cache folder, wherever that cache lives on this machine."""
    from ..models import DEFAULT_MODEL_NAME, default_model_dir

    base = manifest.get("base") or {}
    source = base.get("source")
    if not source or (base.get("name") == DEFAULT_MODEL_NAME and
                      (Path(source) == default_model_dir() or not Path(source).exists())):
        return "default"
    return str(source)


def load_base(manifest: dict, model: str | None = None, **kwargs):
    """``model`` when given (the fingerprint check still guards it), else the base the
    manifest records; ``kwargs`` go to :func:`~slimtune.models.load_model`."""
    from ..errors import ModelLoadError
    from ..models import load_model

    if model is not None:
        return load_model(model, **kwargs)
    spec = recorded_base(manifest)
    try:
        return load_model(spec, **kwargs)
    except ModelLoadError as e:
        raise ModelLoadError(f"the delta's base, {spec} (from its manifest), does not load "
                             f"here ({e}); pass --model") from e


MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _recorded_dtype(source: str) -> str | None:
    """The dtype a model folder (or a hub id already in the local cache) says its weights
    have, as one of :data:`MERGE_DTYPES`; None when it says nothing we know."""
    import json

    path = Path(source).expanduser()
    config = path / "config.json" if path.is_dir() else None
    if config is None and not path.suffix:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
            config = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a valid repo id: nothing recorded
            config = None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8")) if config else {}
    except (OSError, ValueError):
        return None
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))


@dataclass
class Merged:
    out: Path
    base: str  # the base's name
    dtype: str  # one of MERGE_DTYPES
    dtype_reason: str  # why that dtype


def merge_to_folder(folder: str | Path, out: str | Path, *, model: str | None = None,
                    dtype: str | None = None, ref: str | None = None) -> Merged:
    """Write base + delta as one model folder that transformers loads without slimtune.

    Refuses a delta that cannot merge before loading anything. The merge runs in fp32;
    the folder is then cast to ``dtype`` (default: the base's own dtype as its config
    records it, else fp32), so a bf16 base does not come back twice its size.
    """
    from ..fileio import atomic_dir, write_json
    from ..models import fingerprint

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    manifest = verify_delta(folder)
    if manifest.get("mergeable") is False:
        why = (f" (its experts are routed per token; run it attached: --delta {ref})"
               if manifest["method"] == "experts" else "")
        raise DeltaError(f"{ref} ({manifest['method']}) cannot be merged into the base{why}")
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserInputError(f"dtype {dtype!r}: use one of {', '.join(MERGE_DTYPES)}")
    if out.exists():
        raise UserInputError(f"{out} already exists; choose a new --out folder")
    loaded = load_base(manifest, model, dtype=torch.float32)
    if dtype is None:
        dtype = _recorded_dtype(loaded.source)
        reason = "the base's own" if dtype else "the base's dtype is not recorded"
        dtype = dtype or "fp32"
    else:
        reason = "as asked"
    applied = apply_delta(loaded.model, folder, fingerprint(loaded.model), merge=True, ref=ref)
    applied.model.to(MERGE_DTYPES[dtype])
    with atomic_dir(out) as tmp:
        applied.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json(tmp / "slimtune_delta.json", {
            "version": ref, "method": manifest["method"], "dtype": dtype,
            "base_fingerprint": manifest["base"].get("fingerprint")})
    return Merged(out, loaded.name, dtype, reason)


def resolve_ref(ref: str, store=None) -> tuple[Path, str, object]:
    """(folder, label, store) of a delta reference: a path-like ``ref`` (``./v1``,
    ``runs/x/delta``) is a folder, anything else a store id or tag (in ``store``, opened at
    the default place when None), so a local folder never shadows the store's version."""
    from .store import DeltaStore, is_folder_ref

    if is_folder_ref(ref):
        return Path(ref).expanduser(), ref, store
    store = store if store is not None else DeltaStore()
    try:
        v = store.resolve(ref)
    except DeltaError as e:
        if Path(ref).is_dir():
            raise DeltaError(f"{e}; for the folder {ref} here, write ./{ref}") from e
        raise
    return v.path, v.id if v.id == ref else f"{ref} ({v.id})", store


class DeltaSwitcher:
    """One base model in memory, deltas switched on and off it without reloading.

    ``switch("prod")`` (a store tag or id) or ``switch(path)``; ``switch(None)`` is the base.
    """

    def __init__(self, loaded, store=None) -> None:
        from ..models import fingerprint

        self.loaded = loaded
        self.base = loaded.model
        self.fingerprint = fingerprint(self.base)
        self.store = store
        self.current: Applied | None = None

    @classmethod
    def with_delta(cls, ref: str, store=None, model: str | None = None,
                   **load_kwargs) -> DeltaSwitcher:
        """A switcher with ``ref`` switched on, over ``model`` when given, else over the
        base that ``ref``'s manifest records (a delta of another base then loads its own
        instead of failing the fingerprint check against the default model)."""
        from .format import read_manifest

        folder, _, store = resolve_ref(ref, store)
        sw = cls(load_base(read_manifest(folder), model, **load_kwargs), store)
        sw.switch(ref)
        return sw

    @property
    def model(self) -> nn.Module:
        return self.current.model if self.current else self.base

    @property
    def label(self) -> str:
        return self.current.ref if self.current else "base"

    def resolve(self, ref: str) -> tuple[Path, str]:
        """(folder, label) of ``ref``; see :func:`resolve_ref`."""
        folder, label, self.store = resolve_ref(ref, self.store)
        return folder, label

    def switch(self, ref: str | None) -> nn.Module:
        if self.current is not None:
            self.base = self.current.remove()
            self.current = None
        if ref is not None:
            folder, label = self.resolve(ref)
            self.current = apply_delta(self.base, folder, self.fingerprint, ref=label)
        return self.model

    def generate(self, prompts: list[str], *, raw: bool = False, **kwargs
                 ) -> list[tuple[str, str]]:
        """Greedy completions, each marked with the delta that produced it; prompts go
        through the chat template unless ``raw``, as with ``slimtune generate``."""
        from ..evaluation import chat_prompts, generate

        tok = self.loaded.tokenizer
        outs = generate(self.model, tok, chat_prompts(tok, prompts, raw=raw), **kwargs)
        return [(self.label, o) for o in outs]
