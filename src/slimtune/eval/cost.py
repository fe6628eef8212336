"""Cost measurements: peak memory per phase.

Peak memory is what the phase itself reached: on CUDA the allocator's peak of allocated
bytes; on CPU the process's peak resident set size (Linux's VmHWM, reset at the start of
the phase through /proc/self/clear_refs, or, where that is not allowed, a 5 ms sampler).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # the formatting below is the store's commands', which need no torch
    import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` and ``pm.kind``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self._cuda = torch.cuda
        self.peak_bytes = 0
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._use_hwm = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self._cuda.synchronize(self.device)
            self._cuda.reset_peak_memory_stats(self.device)
        else:
            self._use_hwm = _reset_hwm() and _vm_hwm() is not None
            if not self._use_hwm:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
            self._stop.wait(0.005)

    def read(self) -> int:
        """Peak so far (usable inside the block)."""
        if self.device.type == "cuda":
            return int(self._cuda.max_memory_allocated(self.device))
        if self._use_hwm:
            return int(_vm_hwm() or 0)
        return max(self.peak_bytes, psutil.Process().memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._cuda.synchronize(self.device)
        self.peak_bytes = self.read()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
