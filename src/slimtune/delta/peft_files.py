"""What a peft adapter folder holds, read without peft: its config, its tensors' names,
and whether it could come off a base exactly. Shared by attaching (``methods/lora.py``),
importing (``peft_io.py``) and the server's adapter bank (``serve/bank.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DeltaError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def first_line(e: BaseException) -> str:
    """An error's first line (peft's and safetensors' messages run on), or its type."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_config(path: Path) -> dict[str, Any]:
    """An adapter's ``adapter_config.json``, a JSON object, or a DeltaError naming it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeltaError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise DeltaError(f"{path}: not UTF-8 text") from e
    except OSError as e:
        raise DeltaError(f"{path}: unreadable ({e.strerror})") from e
    if not isinstance(config, dict):
        raise DeltaError(f"{path}: not a JSON object")
    return config


# config keys under which peft trains whole modules: unload() keeps the trained copies
# in the base (and unties a tied head), so such an adapter cannot come off exactly
WHOLE_MODULES = ("modules_to_save", "trainable_token_indices")


# tensor names of an adapter that carries base weights: an embedding LoRA's file holds the
# whole embedding matrix (peft's save_embedding_layers), written into the base on load
BASE_WEIGHT_MARKS = (".base_layer.", "lora_embedding_")


def irremovable(config: dict[str, Any], tensor_names: Iterable[str] = ()) -> str | None:
    """Why the adapter (its config, its tensors' names) could not come off a base exactly,
    or None: it trains whole modules (``modules_to_save``, trainable tokens: unload()
    keeps the trained copies in the base and unties a tied head), or its file carries
    base weights that loading writes into the base."""
    key = next((k for k in WHOLE_MODULES if config.get(k)), None)
    if key is not None:
        return f"it trains whole modules ({key}: {config[key]})"
    name = next((n for n in tensor_names if any(m in n for m in BASE_WEIGHT_MARKS)), None)
    if name is not None:
        return f"it carries base weights ({name}: an adapter on the embeddings)"
    return None


def adapter_tensor_names(folder: Path) -> list[str]:
    """The tensor names in ``folder``'s adapter weights, read from the file's header."""
    from safetensors import safe_open

    path = folder / PEFT_WEIGHTS
    if not path.is_file():
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types
        raise DeltaError(f"{path}: unreadable adapter weights ({first_line(e)})") from e


def refuse_irremovable(config: dict[str, Any], tensor_names: Iterable[str], where: Path) -> None:
    """Refuse, before it is put on a base, an adapter that could not come off exactly."""
    why = irremovable(config, tensor_names)
    if why is not None:
        raise DeltaError(
            f"{where}: slimtune cannot take this adapter off its base exactly: {why}; "
            "retrain or re-export it as LoRA on linear layers without modules_to_save"
        )
