"""Apply a delta to a loaded base model, and take it off again bit for bit.

How a delta attaches (replaced tensors, scatter-added entries, peft adapters, expert
modules), whether it merges, and how it comes off exactly is its method's
:meth:`~slimtune.methods.Method.attach`; this module verifies the folder, checks the base,
finds the method by the manifest's name in the registry and keeps the undo.

:class:`DeltaSwitcher` keeps one base model loaded and switches deltas on it (hot swap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeltaError, UserInputError
from .format import check_base, verify_delta

if TYPE_CHECKING:
    from ..methods import Method

# set on a model while a delta is applied to it (apply_delta), cleared when it comes off
APPLIED = "_slimtune_applied_delta"


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


def apply_delta(
    model: nn.Module,
    folder: str | Path,
    base_fingerprint: str,
    *,
    merge: bool = False,
    ref: str | None = None,
) -> Applied:
    """Verify ``folder``, check it belongs to this base, and attach it to ``model`` the way
    its method (looked up in the registry by the manifest's name) says. One delta at a
    time: a model that carries one is refused (stacked deltas' undos are not exact)."""
    from ..methods import METHODS

    carried = getattr(model, APPLIED, None)
    if carried is not None:
        raise DeltaError(
            f"{ref or folder}: the model already carries the delta {carried}; take it off "
            "first (the remove() of what apply_delta returned; a model given to load_delta "
            "keeps its delta: load the base again), or switch deltas with a DeltaSwitcher: "
            "deltas do not stack"
        )
    folder = Path(folder)
    manifest = verify_delta(folder)
    check_base(manifest, base_fingerprint, folder)
    method = METHODS.get(manifest["method"])
    if method is None:
        raise DeltaError(f"{folder}: unknown method {manifest['method']!r}")
    label = ref or str(folder)
    if merge and not method.mergeable:
        raise DeltaError(_merge_refusal(label, method))
    _refuse_quantized_base(model, label, method, merge)
    attached = method.attach(model, folder, manifest, merge=merge)
    model.__dict__[APPLIED] = label

    def unmark() -> None:
        model.__dict__.pop(APPLIED, None)

    # undos run in reverse: the method's first, then the mark comes off
    return Applied(attached.model, manifest, label, attached.merged, [unmark, attached.undo])


def _merge_refusal(ref: str, method: type[Method]) -> str:
    why = (
        f" ({method.why_not_mergeable}; run it attached: --delta {ref})"
        if method.why_not_mergeable
        else ""
    )
    return f"{ref} ({method.name}) cannot be merged into the base{why}"


def _refuse_quantized_base(model: nn.Module, ref: str, method: type[Method], merge: bool) -> None:
    """On a quantized base, refuse in one line before anything is written: a merge (the
    delta would be rounded away in the quantized weights, and nothing could undo it), and
    a delta whose method has no way to run there (``full`` writes the base weights: into
    int8 ones it would be truncated to garbage; peft's DoRA fails on 8-bit layers)."""
    from ..model.quantize import quantization_of

    kind = quantization_of(model)
    if kind == "none":
        return
    if merge:
        raise DeltaError(
            f"{ref} cannot be merged into a quantized base ({kind} weights cannot hold it); "
            f"run it attached (--delta {ref}), or merge it into the full-precision base "
            "(delta apply --out)"
        )
    if kind in method.quantizations:
        return
    takes = method.quantizations
    why = (
        f"{method.name} runs on {' or '.join(takes)} only; load the base with --quantize "
        f"{takes[0]} or without --quantize"
        if takes
        else "its delta replaces base weights, which quantized ones cannot hold; load the "
        "base without --quantize"
    )
    raise DeltaError(f"{ref} ({method.name}) cannot run on an {kind}-quantized base: {why}")


def load_delta(
    folder: str | Path, model: nn.Module, base_fingerprint: str
) -> tuple[nn.Module, dict]:
    """Verify ``folder`` and attach it to the base ``model`` (unmerged where the method
    allows); return (model to run, manifest)."""
    applied = apply_delta(model, folder, base_fingerprint)
    return applied.model, applied.manifest


def recorded_base(manifest: dict) -> str:
    """The model spec (for :func:`~slimtune.model.loading.load_model`) of the base the delta was
    trained on, as its manifest records it: ``base.source``; for a packaged model's cache folder
    its spec (``default``, ``gemma3-270m``), wherever that cache lives on this machine."""
    from ..model.loading import PACKAGED_MODELS, packaged_model_dir

    base = manifest.get("base") or {}
    source = base.get("source")
    for spec, packaged in PACKAGED_MODELS.items():
        if base.get("name") != packaged.name:
            continue
        # the cache folder here or on the machine that trained it; never a hub id of the
        # same name (other weights: the original, not the dequantized GGUF)
        if not source or Path(source) == packaged_model_dir(spec):
            return spec
        cache_like = Path(source).parent.name == "models" and Path(source).name == packaged.name
        if cache_like and not Path(source).exists():
            return spec
    return str(source) if source else "default"


def load_base(manifest: dict, model: str | None = None, *, quantize: str = "none", **kwargs):
    """``model`` when given (the fingerprint check still guards it), else the base the
    manifest records; ``quantize`` (``nf4``, ``int8``) loads its block linears quantized,
    whatever base the delta was trained on (the fingerprint is the full-precision one's);
    ``kwargs`` go to :func:`~slimtune.model.loading.load_model`."""
    from ..errors import ModelLoadError
    from ..model.loading import load_model

    if model is not None:
        return load_model(model, quantize=quantize, **kwargs)
    spec = recorded_base(manifest)
    try:
        return load_model(spec, quantize=quantize, **kwargs)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"the delta's base, {spec} (from its manifest), does not load here ({e}); pass --model"
        ) from e


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


def _default_merge_dtype(manifest: dict, source: str) -> tuple[str, str]:
    """(dtype, why) of a merged folder when none is asked: bf16 for a delta trained on a
    quantized base (its training computed in 16 bits at most, and fp32 would write the
    model it was meant to shrink at twice bf16's size), else the base's own dtype as its
    config records it, else fp32."""
    trained_on = str((manifest.get("training") or {}).get("quantize") or "none")
    if trained_on != "none":
        return "bf16", f"the delta was trained on a {trained_on}-quantized base"
    recorded = _recorded_dtype(source)
    if recorded:
        return recorded, "the base's own"
    return "fp32", "the base's dtype is not recorded"


@dataclass
class Merged:
    out: Path
    base: str  # the base's name
    dtype: str  # one of MERGE_DTYPES
    dtype_reason: str  # why that dtype


def merge_to_folder(
    folder: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    dtype: str | None = None,
    ref: str | None = None,
) -> Merged:
    """Write base + delta as one model folder that transformers loads without slimtune.

    Refuses a delta that cannot merge before loading anything. The merge runs in fp32 on
    the full-precision base (also for a delta trained on a quantized one); the folder is
    then cast to ``dtype`` (default: bf16 for a delta trained with ``quantize``, else the
    base's own dtype as its config records it, else fp32), so a bf16 base does not come
    back twice its size.
    """
    from ..fileio import atomic_dir, write_json
    from ..methods import METHODS
    from ..model.loading import fingerprint

    folder, out = Path(folder), Path(out)
    ref = ref or str(folder)
    manifest = verify_delta(folder)
    method = METHODS.get(manifest["method"])
    if method is None:
        raise DeltaError(f"{folder}: unknown method {manifest['method']!r}")
    if manifest.get("mergeable") is False or not method.mergeable:
        raise DeltaError(_merge_refusal(ref, method))
    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserInputError(f"dtype {dtype!r}: use one of {', '.join(MERGE_DTYPES)}")
    if out.exists():
        raise UserInputError(f"{out} already exists; choose a new --out folder")
    loaded = load_base(manifest, model, dtype=torch.float32)
    if dtype is None:
        dtype, reason = _default_merge_dtype(manifest, loaded.source)
    else:
        reason = "as asked"
    applied = apply_delta(loaded.model, folder, fingerprint(loaded.model), merge=True, ref=ref)
    applied.model.to(MERGE_DTYPES[dtype])
    with atomic_dir(out) as tmp:
        # merged: a transformers model again, which nn.Module's __getattr__ cannot know
        applied.model.save_pretrained(tmp)  # type: ignore[operator]
        loaded.tokenizer.save_pretrained(tmp)
        write_json(
            tmp / "slimtune_delta.json",
            {
                "version": ref,
                "method": manifest["method"],
                "dtype": dtype,
                "base_fingerprint": manifest["base"].get("fingerprint"),
            },
        )
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
        from ..model.loading import fingerprint

        self.loaded = loaded
        self.base = loaded.model
        self.fingerprint = fingerprint(self.base)
        self.store = store
        self.current: Applied | None = None

    @classmethod
    def with_delta(
        cls,
        ref: str,
        store=None,
        model: str | None = None,
        *,
        quantize: str = "none",
        **load_kwargs,
    ) -> DeltaSwitcher:
        """A switcher with ``ref`` switched on, over ``model`` when given, else over the
        base that ``ref``'s manifest records (a delta of another base then loads its own
        instead of failing the fingerprint check against the default model); ``quantize``
        as for :func:`load_base`."""
        from .format import read_manifest

        folder, _, store = resolve_ref(ref, store)
        loaded = load_base(read_manifest(folder), model, quantize=quantize, **load_kwargs)
        sw = cls(loaded, store)
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

    def generate(self, prompts: list[str], *, raw: bool = False, **kwargs) -> list[tuple[str, str]]:
        """Greedy completions, each marked with the delta that produced it; prompts go
        through the chat template unless ``raw``, as with ``slimtune generate``."""
        from ..eval.evaluate import chat_prompts, generate

        tok = self.loaded.tokenizer
        outs = generate(self.model, tok, chat_prompts(tok, prompts, raw=raw), **kwargs)
        return [(self.label, o) for o in outs]
