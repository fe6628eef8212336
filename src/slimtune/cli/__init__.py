"""The ``slimtune`` command: parses, calls the library, prints. No computing here."""

from .app import main

__all__ = ["main"]
