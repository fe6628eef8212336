"""The version, in its own module so any part of the package can read it without importing
the public API (which imports every part)."""

__version__ = "0.1.0"
