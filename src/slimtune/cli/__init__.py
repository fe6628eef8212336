"""The ``slimtune`` command: parses, calls the library, prints. No computing here."""

from .main import main

__all__ = ["main"]
