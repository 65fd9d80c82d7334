"""Numba kernels (installed as `airobackend.kernels`): block dequantization, quantized mat-vec / mat-mat for every
GGML type, norms, RoPE, attention.

Jit options live here in one place. Every kernel is compiled lazily and cached on disk (`cache=True`);
`AIRO_NUMBA_CACHE=0` turns the cache off.
"""
from __future__ import annotations

import os

CACHE = os.environ.get("AIRO_NUMBA_CACHE", "1") != "0"
JIT = dict(nogil=True, cache=CACHE, fastmath=True, boundscheck=False)
JIT_PARALLEL = dict(JIT, parallel=True)
