"""The model stage: load a base (default, folder, GGUF, hub id) and find its parts.

``loading.py`` loads, caches and fingerprints; ``anatomy.py`` finds the decoder layers,
final norm, head and linear modules of any supported architecture.
"""
