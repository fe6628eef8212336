"""Deltas: the product of a fine-tuning run, kept apart from the base model.

The store and a delta's manifest need no torch; applying one does, and imports it on first
use (``slimtune.lazy``).
"""

from typing import TYPE_CHECKING

from ..lazy import exports

_WHERE = {
    "Applied": ".apply",
    "DeltaSwitcher": ".apply",
    "apply_delta": ".apply",
    "load_delta": ".apply",
    "MANIFEST": ".format",
    "check_base": ".format",
    "delta_bytes": ".format",
    "read_manifest": ".format",
    "save_delta": ".format",
    "verify_delta": ".format",
    "Manifest": ".manifest",
    "DeltaStore": ".store",
}
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

if TYPE_CHECKING:  # a type checker reads each name from its module (and flags typos)
    from .apply import Applied, DeltaSwitcher, apply_delta, load_delta
    from .format import MANIFEST, check_base, delta_bytes, read_manifest, save_delta, verify_delta
    from .manifest import Manifest
    from .store import DeltaStore
else:
    __getattr__, __dir__ = exports(__name__, _WHERE)
