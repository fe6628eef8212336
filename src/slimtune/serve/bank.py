"""LoRA deltas side by side on one base, chosen per row of a batch.

A LoRA delta never writes the base weights: peft puts its ``A``/``B`` beside each adapted
linear. Many of them can therefore sit on the base at once, and peft's ``adapter_names``
(one name per row, ``__base__`` for the base) runs each row of one forward through its own
adapter. Requests for different LoRA versions and for the base then share a batch: one
pass over the base weights for all of them, plus each adapter's small matmuls on its rows.

The bank keeps up to ``capacity`` adapters loaded (least recently used go first). A delta
that writes the base (full, sparse, rosa's sparse part) or routes it (experts) cannot
share the base with them: before such a batch the bank :meth:`release` s the base (peft's
``unload``; the base weights were never written, so it comes back bit for bit) and loads
its adapters again, from disk, when LoRA traffic returns.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..delta.format import check_base, verify_delta
from ..delta.peft_files import PEFT_CONFIG, adapter_tensor_names, irremovable, read_config
from ..errors import DeltaError

BASE_ROW = "__base__"  # peft's name for "no adapter on this row"


def adapter_name(version: str) -> str:
    """A name peft accepts as a module key for a store version id."""
    return "v_" + re.sub(r"\W", "_", version)


def can_hold(folder: Path) -> bool:
    """Whether the LoRA adapter in ``folder`` can sit beside others on the base: not one
    that trains the base's biases (peft writes them into the base layers, under every
    row, and holds one such adapter at most), nor DoRA or aLoRA (no per-row names), nor
    one that trains whole modules (it would stay in the base: the switcher refuses it)."""
    try:
        config = read_config(Path(folder) / PEFT_CONFIG)
        names = adapter_tensor_names(Path(folder))
    except DeltaError:
        return False
    return (
        config.get("peft_type") == "LORA"
        and irremovable(config, names) is None
        and config.get("bias", "none") == "none"
        and not config.get("use_dora")
        and not config.get("alora_invocation_tokens")
    )


class LoraBank:
    """Loaded LoRA adapters over ``base`` (whose fingerprint is ``fingerprint``)."""

    def __init__(self, base: nn.Module, fingerprint: str, *, capacity: int = 16) -> None:
        if capacity < 1:
            raise ValueError("the bank holds at least one adapter")
        self.base, self.fingerprint, self.capacity = base, fingerprint, capacity
        self.model: nn.Module | None = None  # the PeftModel while any adapter is loaded
        self._loaded: OrderedDict[str, str] = OrderedDict()  # version -> adapter name

    @property
    def active(self) -> bool:
        return self.model is not None

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def ready(self, folders: dict[str, Path]) -> tuple[nn.Module, dict[str, Exception]]:
        """The model with every version in ``folders`` (id -> delta folder) loaded, and the
        versions that failed to load (with why: their requests fail, the others run);
        adapters not asked for make room when the bank is full."""
        if len(folders) > self.capacity:
            raise ValueError(f"{len(folders)} adapters asked for; the bank holds {self.capacity}")
        for version in folders:  # in use now: the last to be evicted
            if version in self._loaded:
                self._loaded.move_to_end(version)
        failed: dict[str, Exception] = {}
        for version, folder in folders.items():
            if version not in self._loaded:
                try:  # loaded first: one that fails to load evicts nobody
                    self._load(version, Path(folder))
                except Exception as e:
                    failed[version] = e
                else:
                    self._evict(keep=set(folders))
        return (self.model if self.model is not None else self.base), failed

    def rows(self, versions: list[str | None]) -> list[str]:
        """peft's ``adapter_names`` for a batch whose row i is served by ``versions[i]``
        (None: the base)."""
        return [BASE_ROW if v is None else self._loaded[v] for v in versions]

    def release(self) -> nn.Module:
        """Take every adapter off; the base as it was (its weights were never written)."""
        if self.model is not None:
            self.base = self.model.unload()  # type: ignore[operator]
            self.model = None
            self._loaded.clear()
        return self.base

    def _load(self, version: str, folder: Path) -> None:
        """Load one adapter; on any failure the base is left as it was before (peft adds an
        adapter's layers before it reads its weights: those come off again)."""
        from peft import PeftConfig, PeftModel

        manifest = verify_delta(folder)
        check_base(manifest, self.fingerprint, folder)
        if not can_hold(folder):
            raise DeltaError(f"{folder}: not a LoRA adapter that can share the base with others")
        name = adapter_name(version)
        fresh = self.model is None
        try:
            if fresh:
                config = PeftConfig.from_pretrained(str(folder))
                config.inference_mode = True
                self.model = PeftModel(self.base, config, adapter_name=name)
            self.model.load_adapter(str(folder), adapter_name=name)  # type: ignore[union-attr,operator]
        except Exception as e:
            if fresh and self.model is not None:
                self.base = self.model.unload()  # type: ignore[operator]
                self.model = None
            elif self.model is not None and name in self.model.peft_config:
                self.model.delete_adapter(name)  # type: ignore[operator]
            raise DeltaError(f"{folder}: peft could not load the adapter ({e})") from e
        self.model.eval()  # type: ignore[union-attr]
        self._loaded[version] = name

    def _evict(self, keep: set[str]) -> None:
        while len(self._loaded) > self.capacity:
            victim = next((v for v in self._loaded if v not in keep), None)
            if victim is None:
                return
            name = self._loaded.pop(victim)
            if not self._loaded:  # peft keeps at least one adapter: drop the wrapper
                self._loaded[victim] = name
                self.release()
                return
            self.model.delete_adapter(name)  # type: ignore[union-attr,operator]
