"""``slimtune serve``: one base in memory, deltas chosen per request over HTTP.

The engine (torch) is imported on first use: the store reads an A/B split's syntax from
``traffic.py`` without it (``slimtune delta split``).
"""

from typing import TYPE_CHECKING

from ..lazy import exports

__all__ = ["BASE", "Engine", "Finished", "Job", "UnknownModel"]

if TYPE_CHECKING:  # a type checker reads each name from its module (and flags typos)
    from .engine import BASE, Engine, Finished, Job, UnknownModel
else:
    __getattr__, __dir__ = exports(__name__, dict.fromkeys(__all__, ".engine"))
