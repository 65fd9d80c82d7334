"""Numba kernels (installed as `airobackend.kernels`): block dequantization, quantized mat-vec / mat-mat for every
GGML type, norms, RoPE, attention.

Jit options live here in one place. Every kernel is compiled lazily and cached on disk (`cache=True`, in Numba's
cache folder, NUMBA_CACHE_DIR); `AIRO_NUMBA_CACHE=0` turns the cache off. The kernels know nothing of the
application: where they write is given them through the environment (`NUMBA_CACHE_DIR`, `AIRO_KERNEL_SOURCE_DIR`),
which the application sets from its cache root before any kernel module loads.
"""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

CACHE = os.environ.get("AIRO_NUMBA_CACHE", "1") != "0"
JIT = dict(nogil=True, cache=CACHE, fastmath=True, boundscheck=False)
JIT_PARALLEL = dict(JIT, parallel=True)


def source_dir() -> Path:
    """Where the generated fast-kernel sources are written: $AIRO_KERNEL_SOURCE_DIR, else a per-user folder in the
    temporary directory."""
    env = os.environ.get("AIRO_KERNEL_SOURCE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(tempfile.gettempdir()) / f"airobackend-{os.getuid()}" / "kernels"


def _load_tbb() -> None:
    """Make Numba's TBB threading layer available (it is then picked before OpenMP).

    TBB keeps 2 threads ~2x one thread even on a busy machine: its idle workers do not hold up a parallel loop, while
    GNU OpenMP's barrier waits for every thread, so a descheduled thread stalls the whole mat-vec
    (bench/results/2026-11-27.md). The pip `tbb` wheel puts libtbb.so.12 in <prefix>/lib, which is not on the loader
    path; loading it by absolute path first lets Numba's tbbpool find it. Harmless when absent.
    """
    for prefix in (sys.prefix, sys.base_prefix):
        lib = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.isfile(lib):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
            return


if os.environ.get("NUMBA_THREADING_LAYER", "default") in ("default", "safe", "tbb"):
    _load_tbb()
