"""Deltas: the product of a fine-tuning run, kept apart from the base model."""

from .apply import Applied, DeltaSwitcher, apply_delta, load_delta
from .format import MANIFEST, check_base, delta_bytes, read_manifest, save_delta, verify_delta
from .manifest import Manifest
from .store import DeltaStore

__all__ = [
    "MANIFEST",
    "Applied",
    "DeltaStore",
    "DeltaSwitcher",
    "Manifest",
    "apply_delta",
    "check_base",
    "delta_bytes",
    "load_delta",
    "read_manifest",
    "save_delta",
    "verify_delta",
]
