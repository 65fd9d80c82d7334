"""Sequence kernels: repeats in a token sequence (DRY's step 2 in the sampler, a linear scan that is slow in Python).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from airobackend.kernels import JIT


@njit(**JIT)
def suffix_repeats(t: np.ndarray, limit: int, out: np.ndarray) -> None:
    """out[j] = min(limit, length of the longest common suffix of t[:j + 1] and t) for j < n - 1; out[n - 1] = 0.

    The Z-algorithm run backwards from the end (linear time), as KoboldCpp's and llama.cpp's DRY samplers do.
    """
    n = t.shape[0]
    for j in range(n):
        out[j] = 0
    last = n - 1
    lt = 0
    rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and t[last - m] == t[last - m - k]:
                m += 1
            out[last - k] = min(m, limit)
            if m > 0:
                lt = k
                rt = k + m - 1
        else:
            pair = out[last - (k - lt)]
            if pair < rt - k + 1:
                out[last - k] = min(pair, limit)
            else:
                i = rt + 1
                while i < n and t[last - i] == t[last - (i - k)]:
                    i += 1
                out[last - k] = min(i - k, limit)
                lt = k
                rt = i - 1
