"""``slimtune serve``: one base in memory, deltas chosen per request over HTTP."""

from .engine import BASE, Engine, Finished, Job, UnknownModel

__all__ = ["BASE", "Engine", "Finished", "Job", "UnknownModel"]
