"""Plain-numpy oracle for every kernel: block dequantizers for all GGML weight types, RMSNorm, RoPE, attention.

Written from the block layouts (`ggml.c` and `k_quants.c` of llama.cpp at dadbed9) and checked against gguf-py's
independent `gguf.quants.dequantize` on the llama.cpp-made fixtures. Slow and simple on purpose: tests compare the Numba
kernels with this module, and model.py never imports it.
"""
from __future__ import annotations

import numpy as np

from .ggml_types import BLOCK, WEIGHT_TYPES, GGMLType, UnsupportedType


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from a [..., 2] uint8 array -> float32 [...]."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4")[..., 0]


# ---- legacy 32-weight blocks: element j (0..15) is the low nibble of qs[j], element j+16 the high nibble ----

def _q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 2:18].astype(np.int32)
    q = np.concatenate([qs & 15, qs >> 4], axis=1) - 8
    return d * q


def _q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    qs = b[:, 4:20].astype(np.int32)
    q = np.concatenate([qs & 15, qs >> 4], axis=1)
    return d * q + m


def _high_bits(qh_bytes: np.ndarray) -> np.ndarray:
    """Bit j of the little-endian u32 qh is the 5th bit (value 16) of element j, j = 0..31."""
    qh = qh_bytes.astype(np.uint32)
    qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
    return (((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])[:, None]
    qs = b[:, 6:22].astype(np.int32)
    q = np.concatenate([qs & 15, qs >> 4], axis=1) | _high_bits(b[:, 2:6])
    return d * (q - 16)


def _q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    qs = b[:, 8:24].astype(np.int32)
    q = np.concatenate([qs & 15, qs >> 4], axis=1) | _high_bits(b[:, 4:8])
    return d * q + m


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, 0:2])[:, None]
    return d * b[:, 2:34].view(np.int8).astype(np.float32)


# ---- K-quants: 256-weight super-blocks ----

def _q2_k(b: np.ndarray) -> np.ndarray:
    """84 B: scales[16] (lo nibble scale, hi nibble min), qs[64], fp16 d, fp16 dmin."""
    n = b.shape[0]
    scales = b[:, 0:16].astype(np.int32)
    qs = b[:, 16:80].astype(np.int32)
    d, dmin = _f16(b[:, 80:82])[:, None], _f16(b[:, 82:84])[:, None]
    y = np.empty((n, 256), np.float32)
    for h in range(2):                      # 128-weight halves use qs[32h : 32h+32]
        q = qs[:, 32 * h: 32 * h + 32]
        for j in range(4):                  # 2-bit planes at shift 2j
            v = (q >> (2 * j)) & 3
            for s in range(2):              # two 16-weight sub-blocks per plane
                sc = scales[:, 8 * h + 2 * j + s][:, None]
                o = 128 * h + 32 * j + 16 * s
                y[:, o:o + 16] = d * (sc & 15) * v[:, 16 * s:16 * s + 16] - dmin * (sc >> 4)
    return y


def _q3_k_scales(s12: np.ndarray) -> np.ndarray:
    """The sixteen signed 6-bit scales of a Q3_K block, packed in 12 bytes (stored with +32 offset)."""
    s = s12.astype(np.int32)
    out = np.empty((s.shape[0], 16), np.int32)
    for k in range(16):
        low = s[:, k] & 15 if k < 8 else s[:, k - 8] >> 4
        high = (s[:, 8 + k % 4] >> (2 * (k // 4))) & 3
        out[:, k] = (low | (high << 4)) - 32
    return out


def _q3_k(b: np.ndarray) -> np.ndarray:
    """110 B: hmask[32], qs[64], scales[12], fp16 d. Value = 2 low bits - (4 if hmask bit clear else 0)."""
    n = b.shape[0]
    hmask = b[:, 0:32].astype(np.int32)
    qs = b[:, 32:96].astype(np.int32)
    sc = _q3_k_scales(b[:, 96:108])
    d = _f16(b[:, 108:110])[:, None]
    y = np.empty((n, 256), np.float32)
    for h in range(2):
        q = qs[:, 32 * h: 32 * h + 32]
        for j in range(4):
            m = 1 << (4 * h + j)
            v = ((q >> (2 * j)) & 3) - np.where(hmask & m, 0, 4)
            for s in range(2):
                o = 128 * h + 32 * j + 16 * s
                y[:, o:o + 16] = d * sc[:, 8 * h + 2 * j + s][:, None] * v[:, 16 * s:16 * s + 16]
    return y


def _k4_scale_min(s12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eight 6-bit scales and mins of Q4_K / Q5_K packed in 12 bytes (llama.cpp get_scale_min_k4)."""
    q = s12.astype(np.int32)
    sc = np.empty((q.shape[0], 8), np.int32)
    mn = np.empty((q.shape[0], 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = q[:, j] & 63
            mn[:, j] = q[:, j + 4] & 63
        else:
            sc[:, j] = (q[:, j + 4] & 15) | ((q[:, j - 4] >> 6) << 4)
            mn[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return sc, mn


def _q4_k(b: np.ndarray) -> np.ndarray:
    """144 B: fp16 d, fp16 dmin, scales[12], qs[128]; 8 sub-blocks of 32."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _k4_scale_min(b[:, 4:16])
    qs = b[:, 16:144].astype(np.int32)
    y = np.empty((n, 256), np.float32)
    for g in range(4):                      # 64 weights per 32 bytes: low nibbles then high nibbles
        q = qs[:, 32 * g: 32 * g + 32]
        for s, v in enumerate((q & 15, q >> 4)):
            k = 2 * g + s
            y[:, 64 * g + 32 * s: 64 * g + 32 * s + 32] = d * sc[:, k:k + 1] * v - dmin * mn[:, k:k + 1]
    return y


def _q5_k(b: np.ndarray) -> np.ndarray:
    """176 B: fp16 d, fp16 dmin, scales[12], qh[32], qs[128]; as Q4_K with a 5th bit from qh."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, mn = _k4_scale_min(b[:, 4:16])
    qh = b[:, 16:48].astype(np.int32)
    qs = b[:, 48:176].astype(np.int32)
    y = np.empty((n, 256), np.float32)
    for g in range(4):
        q = qs[:, 32 * g: 32 * g + 32]
        for s, v in enumerate((q & 15, q >> 4)):
            k = 2 * g + s
            v = v + np.where(qh & (1 << k), 16, 0)
            y[:, 64 * g + 32 * s: 64 * g + 32 * s + 32] = d * sc[:, k:k + 1] * v - dmin * mn[:, k:k + 1]
    return y


def _q6_k(b: np.ndarray) -> np.ndarray:
    """210 B: ql[128], qh[64], int8 scales[16], fp16 d; 16 sub-blocks of 16, 6-bit values - 32."""
    n = b.shape[0]
    ql = b[:, 0:128].astype(np.int32)
    qh = b[:, 128:192].astype(np.int32)
    sc = b[:, 192:208].view(np.int8).astype(np.int32)
    d = _f16(b[:, 208:210])[:, None]
    y = np.empty((n, 256), np.float32)
    for h in range(2):
        L, H = ql[:, 64 * h: 64 * h + 64], qh[:, 32 * h: 32 * h + 32]
        parts = (
            (L[:, 0:32] & 15) | (((H >> 0) & 3) << 4),
            (L[:, 32:64] & 15) | (((H >> 2) & 3) << 4),
            (L[:, 0:32] >> 4) | (((H >> 4) & 3) << 4),
            (L[:, 32:64] >> 4) | (((H >> 6) & 3) << 4),
        )
        for p, q in enumerate(parts):       # part p covers y[128h + 32p + l], l = 0..31, scale sc[8h + 2p + l//16]
            for half in range(2):
                o = 128 * h + 32 * p + 16 * half
                s = sc[:, 8 * h + 2 * p + half][:, None]
                y[:, o:o + 16] = d * s * (q[:, 16 * half:16 * half + 16] - 32)
    return y


_DEQUANT = {
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1, GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Dequantize `n_elements` weights of `ggml_type` from raw little-endian block bytes.

    Args:
        raw: uint8 array (any shape, C-contiguous data) holding at least the blocks for `n_elements` weights.
        ggml_type: a GGMLType (or its int id).
        n_elements: number of weights; must be a multiple of the type's block size.

    Returns:
        float32 1-D array of length `n_elements`.
    """
    t = GGMLType(int(ggml_type))
    if t not in WEIGHT_TYPES:
        raise UnsupportedType(f"no dequantizer for tensor type {t.name}")
    per_block, nbytes = BLOCK[t]
    if n_elements % per_block:
        raise UnsupportedType(f"{n_elements} elements is not a whole number of {t.name} blocks of {per_block}")
    n_blocks = n_elements // per_block
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if flat.size < n_blocks * nbytes:
        raise UnsupportedType(f"{t.name}: need {n_blocks * nbytes} bytes for {n_elements} weights, got {flat.size}")
    flat = flat[: n_blocks * nbytes]
    if t == GGMLType.F32:
        return flat.view("<f4").astype(np.float32)
    if t == GGMLType.F16:
        return flat.view("<f2").astype(np.float32)
    return _DEQUANT[t](flat.reshape(n_blocks, nbytes)).reshape(-1).astype(np.float32, copy=False)


# ---- the other ops, as llama.cpp computes them (`llama_build_graph` and `ggml.c` at dadbed9) ----

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis (mean taken in float64 like ggml)."""
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)).astype(np.float32) * weight


def rope(x: np.ndarray, pos: np.ndarray, freq_base: float = 10000.0, freq_scale: float = 1.0,
         freq_factors: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp "normal" RoPE (mode 0, adjacent pairs) on x [n_tok, n_heads, head_dim] at positions pos [n_tok].

    theta_i = freq_scale * p * freq_base^(-2i/head_dim) / freq_factors[i] for pair (x[2i], x[2i+1]).
    """
    head_dim = x.shape[-1]
    i = np.arange(head_dim // 2, dtype=np.float64)
    theta = freq_scale * np.asarray(pos, np.float64)[:, None] * freq_base ** (-2.0 * i / head_dim)  # [n_tok, hd/2]
    if freq_factors is not None:
        theta = theta / np.asarray(freq_factors, np.float64)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    y = np.empty(x.shape, np.float64)
    y[..., 0::2] = x0 * c - x1 * s
    y[..., 1::2] = x0 * s + x1 * c
    return y.astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU: silu(gate) * up, silu(z) = z / (1 + exp(-z))."""
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, f16_round: bool = False) -> np.ndarray:
    """Causal attention with grouped-query heads.

    q: [n_tok, n_head, head_dim] for positions n_past..n_past+n_tok-1; k, v: [n_past+n_tok, n_head_kv, head_dim]
    (the whole cache up to the last new position). Returns [n_tok, n_head, head_dim].
    f16_round: round q and the softmax row to fp16 before their products, as llama.cpp does with an F16 KV cache.
    """
    if f16_round:
        q = q.astype(np.float16).astype(np.float32)
    n_tok, n_head, head_dim = q.shape
    n_head_kv = k.shape[1]
    n_gqa = n_head // n_head_kv
    out = np.empty(q.shape, np.float32)
    for t in range(n_tok):
        n_kv = n_past + t + 1
        for h in range(n_head):
            kh, vh = k[:n_kv, h // n_gqa].astype(np.float64), v[:n_kv, h // n_gqa].astype(np.float64)
            p = softmax((kh @ q[t, h].astype(np.float64)).astype(np.float32) / np.sqrt(head_dim))
            if f16_round:
                p = p.astype(np.float32).astype(np.float16).astype(np.float64)
            out[t, h] = p @ vh
    return out
