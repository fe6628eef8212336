"""Fused CPU inference kernel for routed expert adapters: ``cpu_kernel.c``, compiled once per
machine with the system C compiler and called through ctypes.

Hand-written because nothing in torch runs a low-rank update whose weights differ per token:
grouping the rows by expert (the grouped GEMM) writes k output rows per token and adds them
up afterwards, and on a CPU that memory traffic, not the FLOPs, is the adapter's cost. The C
loop handles one token at a time: its row of x is read once, its k experts' A and B rows
come from cache (E x r x (in + out) floats), and its output row is read and written once.

The shared library is cached under ``cache_root()/kernels`` by a hash of the source, the
flags, the compiler and the CPU (it is built with ``-march=native``). No compiler, or one
that fails: a warning, and the grouped-GEMM path runs instead. ``SLIMTUNE_FUSED_EXPERTS=0``
turns this kernel off with the CUDA one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from .cuda_kernel import TilePlan

SOURCE = Path(__file__).with_name("cpu_kernel.c")
# no -ffast-math: linking it sets flush-to-zero for the whole process; these let the
# compiler vectorise the dot products' reduction and nothing else
FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
]
# tried in this order: without OpenMP the kernel runs on one thread, without -march=native
# (a compiler that does not know it) on the baseline instruction set
ATTEMPTS = [["-march=native", "-fopenmp"], ["-march=native"], []]
_I64, _F32 = ctypes.c_int64, ctypes.c_float
_P = ctypes.c_void_p


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (after one warning) where it cannot be."""
    from ...model.loading import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn(
            "no C compiler found: expert adapters on CPU run the grouped path", stacklevel=3
        )
        return None
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        parts = [SOURCE.read_text(), *FLAGS, str(ATTEMPTS), version, _cpu_id(), platform.machine()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path = cache_root() / "kernels" / f"expert_cpu-{key}.so"
        if not path.exists():
            from ...fileio import atomic_path

            with atomic_path(path) as tmp:
                for extra in ATTEMPTS:
                    done = subprocess.run(
                        [cc, *FLAGS, *extra, str(SOURCE), "-o", str(tmp)],
                        capture_output=True,
                        text=True,
                        timeout=300,
                    )
                    if done.returncode == 0:
                        break
                else:
                    raise RuntimeError(done.stderr.strip()[-2000:])
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"the CPU expert kernel could not be built ({e}); expert adapters on "
            "CPU run the grouped path",
            stacklevel=3,
        )
        return None
    lib.routed_lowrank_add_f32.argtypes = [
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _P,
        _I64,
        _I64,
        _I64,
        _I64,
        _I64,
        _F32,
        _I64,
    ]
    lib.routed_lowrank_add_f32.restype = ctypes.c_int
    return lib


MAX_KR = 256  # k * r; the C kernel's stack buffers


def _transposed(b: torch.Tensor) -> torch.Tensor:
    """B as (E, r, out), each rank's output row contiguous; kept on B itself while B is
    unchanged (same storage and version), so inference does not copy it every pass."""
    key = (b.data_ptr(), b._version, tuple(b.shape))
    hit = getattr(b, "_slimtune_transposed", None)
    if hit is None or hit[0] != key:
        hit = (key, b.detach().transpose(1, 2).contiguous())
        b._slimtune_transposed = hit  # type: ignore[attr-defined]  # a cache kept on the tensor
    return hit[1]


def supports(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, k: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == out.dtype == a.dtype == torch.float32
        and out.is_contiguous()
        and k * a.shape[1] <= MAX_KR
        and library() is not None
    )


def add_routed_lowrank(
    x: torch.Tensor,
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: TilePlan,
    scaling: float,
) -> None:
    """``out[t] += scaling * sum_j g_tj * B_{e_tj} A_{e_tj} x[t]`` in place for the routed
    rows of ``plan`` (sorted by expert set, so runs of rows share their experts' B blocks in
    cache). x (T, in), out (T, out), a (E, r, in), b (E, out, r). The rows are split over
    torch's intra-op threads."""
    n, k = plan.experts.shape
    if n == 0:
        return
    x, a = x.contiguous(), a.contiguous()
    bt = _transposed(b)
    z = torch.empty(n, k * a.shape[1], dtype=torch.float32)
    lib = library()
    assert lib is not None  # supports() checked that the kernel loaded
    code = lib.routed_lowrank_add_f32(
        x.data_ptr(),
        out.data_ptr(),
        a.data_ptr(),
        bt.data_ptr(),
        plan.tokens.data_ptr(),
        plan.experts.data_ptr(),
        plan.gates.data_ptr(),
        z.data_ptr(),
        n,
        x.shape[1],
        out.shape[1],
        a.shape[1],
        k,
        float(scaling),
        max(1, min(torch.get_num_threads(), n // 16)),
    )
    if code:
        raise RuntimeError(f"CPU expert kernel refused k*r = {k * a.shape[1]} > {MAX_KR}")
