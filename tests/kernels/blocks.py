"""Random GGML blocks with sane fp16 scale fields, and the float64 oracle (dequantize @ x)."""
from __future__ import annotations

import numpy as np

from airobackend.quant import BLOCK, GGMLType

# byte offsets of the fp16 fields (d, m / dmin) inside one block
HALF_FIELDS = {
    GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2], GGMLType.Q8_0: [0],
    GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2],
    GGMLType.Q6_K: [208],
}


def random_blocks(t: GGMLType, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_rows, row_bytes] of random blocks of type t (random quants, scales in a realistic range)."""
    per, nb = BLOCK[t]
    if t == GGMLType.F16:
        return (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float16).view(np.uint8)
    if t == GGMLType.F32:
        return (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32).view(np.uint8)
    n_blk = n_cols // per
    raw = rng.integers(0, 256, size=(n_rows, n_blk, nb), dtype=np.uint8)
    for off in HALF_FIELDS[t]:
        h = (rng.uniform(0.2, 1.0, size=(n_rows, n_blk)) * (0.003 if per == 256 else 0.01)).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(n_rows, n_blk, 2)
    if t == GGMLType.Q8_0:   # llama.cpp's quantizer never writes -128
        q = raw[:, :, 2:].view(np.int8)
        q[q == -128] = -127
    return raw.reshape(n_rows, n_blk * nb)


def dequantize(t: GGMLType, raw2d: np.ndarray, n_cols: int) -> np.ndarray:
    """float64 [n_rows, n_cols] weights (airobackend.kernels.reference when present, else gguf-py)."""
    try:
        from airobackend.kernels import reference
        w = reference.dequantize(raw2d, t, raw2d.shape[0] * n_cols)
    except ImportError:
        import gguf
        w = gguf.quants.dequantize(np.ascontiguousarray(raw2d), gguf.GGMLQuantizationType(int(t)))
    return np.asarray(w, dtype=np.float64).reshape(raw2d.shape[0], n_cols)
