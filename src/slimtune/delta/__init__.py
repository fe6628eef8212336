"""Deltas: the product of a fine-tuning run, kept apart from the base model."""

from .format import (
    MANIFEST,
    check_base,
    delta_bytes,
    load_delta,
    read_manifest,
    save_delta,
    verify_delta,
)

__all__ = ["MANIFEST", "check_base", "delta_bytes", "load_delta", "read_manifest", "save_delta",
           "verify_delta"]
