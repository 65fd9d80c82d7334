"""Block dequantization for every GGML weight type, and the generic float32 kernels built on it.

Everything here works on the raw little-endian blocks of the model file: a 2-D uint8 view `w[n_rows, row_bytes]`
(read-only over the mmap is fine), one row of a weight matrix per `w[r]`. fp16 fields (`d`, `dmin`) are decoded
through a 65536-entry uint16 -> float32 table (`f16_table()`), as ggml does, because Numba has no float16.

The generic mat-vec / mat-mat dequantize one row at a time into a small per-chunk float32 scratch (L1/L2 resident)
and take float32 dot products with float32 accumulation: the weights are exactly the file's values and the
activations are never quantized, so results track llama.cpp's `logits_f32deq` reference. The fast integer kernels
live in kernels/fast.py; this module is the portable path and the correctness baseline.

All kernels live in this one module on purpose: Numba's on-disk cache does not notice edits to jitted functions
in other files, so a kernel module never calls jitted code from another module.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload, typeof_impl

from . import JIT, JIT_PARALLEL
from .ggml_types import BLOCK, GGMLType

_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_F16_TABLE.setflags(write=False)


def f16_table() -> np.ndarray:
    """float32[65536]: the value of every fp16 bit pattern (read-only, shared)."""
    return _F16_TABLE


@njit(**JIT)
def _h(src, o, tab):
    """fp16 at byte offset o of src, via the lookup table."""
    return tab[np.int64(src[o]) | (np.int64(src[o + 1]) << 8)]


@njit(**JIT)
def _n(n, tab):
    """n, hidden from LLVM's constant folding (tab always has 65536 entries).

    A block loop with a constant trip count (16, 32) gets fully unrolled and then stays scalar, because the
    stores to dst might alias the loads from src; with a run-time trip count LLVM vectorizes it behind a run-time
    alias check instead, which measured faster (bench/results/2026-11-27.md).
    """
    return n + tab.shape[0] - 65536


# ---- one function per type: dst[:] = the len(dst) weights held by the first blocks of src (a 1-D uint8 view) ----

@njit(**JIT)
def dequant_f32(src, dst, tab):
    """F32: 4 B per weight, little-endian."""
    v = src[: 4 * dst.shape[0]].view(np.float32)
    for i in range(dst.shape[0]):
        dst[i] = v[i]


@njit(**JIT)
def dequant_f16(src, dst, tab):
    """F16: 2 B per weight, little-endian.

    Converted in arithmetic that vectorizes rather than through the table (a gather per weight): sign, exponent
    and mantissa moved into float32 position, times 2^112 (the exponent bias difference) - exact for normal and
    subnormal halves; inf/NaN weights (never in a model) would come out finite.
    """
    h16 = src[: 2 * dst.shape[0]].view(np.uint16)
    bits = dst.view(np.uint32)
    for i in range(dst.shape[0]):
        h = np.int32(h16[i])
        bits[i] = np.uint32(((h & 0x7FFF) << 13) | ((h & 0x8000) << 16))
    for i in range(dst.shape[0]):
        dst[i] *= np.float32(5.192296858534828e33)


@njit(**JIT)
def dequant_q4_0(src, dst, tab):
    """Q4_0: 18 B/block = f16 d + qs[16]; 32 weights, y[j] = d*(lo(qs[j])-8), y[j+16] = d*(hi(qs[j])-8)."""
    n16 = _n(16, tab)
    for b in range(dst.shape[0] // 32):
        o, y = 18 * b, 32 * b
        d = _h(src, o, tab)
        for j in range(n16):
            q = np.int32(src[o + 2 + j])
            dst[y + j] = d * np.float32((q & 15) - 8)
            dst[y + j + 16] = d * np.float32((q >> 4) - 8)


@njit(**JIT)
def dequant_q4_1(src, dst, tab):
    """Q4_1: 20 B/block = f16 d + f16 m + qs[16]; y = d*q + m."""
    n16 = _n(16, tab)
    for b in range(dst.shape[0] // 32):
        o, y = 20 * b, 32 * b
        d, m = _h(src, o, tab), _h(src, o + 2, tab)
        for j in range(n16):
            q = np.int32(src[o + 4 + j])
            dst[y + j] = d * np.float32(q & 15) + m
            dst[y + j + 16] = d * np.float32(q >> 4) + m


@njit(**JIT)
def _qh32(src, o):
    """The little-endian u32 of Q5_0/Q5_1 5th bits: bit j belongs to weight j."""
    return (np.int64(src[o]) | (np.int64(src[o + 1]) << 8) | (np.int64(src[o + 2]) << 16)
            | (np.int64(src[o + 3]) << 24))


@njit(**JIT)
def dequant_q5_0(src, dst, tab):
    """Q5_0: 22 B/block = f16 d + u32 qh + qs[16]; y = d*((nibble | 5th bit << 4) - 16)."""
    n16 = _n(16, tab)
    for b in range(dst.shape[0] // 32):
        o, y = 22 * b, 32 * b
        d = _h(src, o, tab)
        qh = _qh32(src, o + 2)
        for j in range(n16):
            q = np.int64(src[o + 6 + j])
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[y + j] = d * np.float32(lo - 16)
            dst[y + j + 16] = d * np.float32(hi - 16)


@njit(**JIT)
def dequant_q5_1(src, dst, tab):
    """Q5_1: 24 B/block = f16 d + f16 m + u32 qh + qs[16]; y = d*(nibble | 5th bit << 4) + m."""
    n16 = _n(16, tab)
    for b in range(dst.shape[0] // 32):
        o, y = 24 * b, 32 * b
        d, m = _h(src, o, tab), _h(src, o + 2, tab)
        qh = _qh32(src, o + 4)
        for j in range(n16):
            q = np.int64(src[o + 8 + j])
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[y + j] = d * np.float32(lo) + m
            dst[y + j + 16] = d * np.float32(hi) + m


@njit(**JIT)
def dequant_q8_0(src, dst, tab):
    """Q8_0: 34 B/block = f16 d + int8 qs[32]; y = d*q."""
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 32):
        o, y = 34 * b, 32 * b
        d = _h(src, o, tab)
        for j in range(n32):
            q = np.int32(src[o + 2 + j])
            dst[y + j] = d * np.float32(q - ((q >> 7) << 8))     # uint8 -> int8


@njit(**JIT)
def dequant_q2_k(src, dst, tab):
    """Q2_K: 84 B/super-block = scales[16] (lo nibble scale, hi nibble min) + qs[64] + f16 d + f16 dmin.

    Half h (128 weights) reads qs[32h:32h+32]; 2-bit plane j (shift 2j) gives 32 weights y[128h+32j+l],
    l = 0..31, in two sub-blocks of 16 with scale bytes 8h+2j (l < 16) and 8h+2j+1.
    """
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 256):
        o, y = 84 * b, 256 * b
        d, dmin = _h(src, o + 80, tab), _h(src, o + 82, tab)
        for h in range(2):
            for j in range(4):
                sc0, sc1 = np.int32(src[o + 8 * h + 2 * j]), np.int32(src[o + 8 * h + 2 * j + 1])
                dl0, ml0 = d * np.float32(sc0 & 15), dmin * np.float32(sc0 >> 4)
                dl1, ml1 = d * np.float32(sc1 & 15), dmin * np.float32(sc1 >> 4)
                qo, yo = o + 16 + 32 * h, y + 128 * h + 32 * j
                for l in range(n32):
                    q = np.float32((np.int32(src[qo + l]) >> (2 * j)) & 3)
                    dst[yo + l] = (dl0 * q - ml0) if l < 16 else (dl1 * q - ml1)


@njit(**JIT)
def dequant_q3_k(src, dst, tab):
    """Q3_K: 110 B = hmask[32] + qs[64] + scales[12] (16 signed 6-bit, +32 offset) + f16 d.

    As Q2_K's 2-bit planes; bit (4h + j) of hmask[l] set means +0, clear means -4.
    """
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 256):
        o, y = 110 * b, 256 * b
        d = _h(src, o + 108, tab)
        for h in range(2):
            for j in range(4):
                m = 1 << (4 * h + j)
                dl0 = d * np.float32(_q3_scale(src, o + 96, 8 * h + 2 * j))
                dl1 = d * np.float32(_q3_scale(src, o + 96, 8 * h + 2 * j + 1))
                qo, yo = o + 32 + 32 * h, y + 128 * h + 32 * j
                for l in range(n32):
                    q = ((np.int32(src[qo + l]) >> (2 * j)) & 3) - (((np.int32(src[o + l]) & m) == 0) << 2)
                    dst[yo + l] = (dl0 if l < 16 else dl1) * np.float32(q)


@njit(**JIT)
def _q3_scale(src, o, k):
    """Q3_K sub-block k's signed 6-bit scale from the 12 packed bytes at src[o:o+12]."""
    low = (np.int32(src[o + k]) & 15) if k < 8 else (np.int32(src[o + k - 8]) >> 4)
    high = (np.int32(src[o + 8 + (k & 3)]) >> (2 * (k >> 2))) & 3
    return (low | (high << 4)) - 32


@njit(**JIT)
def _scale_min_k4(src, o, j):
    """Sub-block j's 6-bit (scale, min) from the 12 packed bytes at src[o:o+12] (Q4_K / Q5_K)."""
    if j < 4:
        return np.int32(src[o + j]) & 63, np.int32(src[o + j + 4]) & 63
    sc = (np.int32(src[o + j + 4]) & 15) | ((np.int32(src[o + j - 4]) >> 6) << 4)
    mn = (np.int32(src[o + j + 4]) >> 4) | ((np.int32(src[o + j]) >> 6) << 4)
    return sc, mn


@njit(**JIT)
def dequant_q4_k(src, dst, tab):
    """Q4_K: 144 B = f16 d + f16 dmin + scales[12] + qs[128]; 8 sub-blocks of 32.

    Group g (64 weights) reads qs[32g:32g+32]: low nibbles -> sub-block 2g, high nibbles -> sub-block 2g+1.
    """
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 256):
        o, y = 144 * b, 256 * b
        d, dmin = _h(src, o, tab), _h(src, o + 2, tab)
        for g in range(4):
            sc0, mn0 = _scale_min_k4(src, o + 4, 2 * g)
            sc1, mn1 = _scale_min_k4(src, o + 4, 2 * g + 1)
            d0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
            d1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
            qo, yo = o + 16 + 32 * g, y + 64 * g
            for l in range(n32):
                q = np.int32(src[qo + l])
                dst[yo + l] = d0 * np.float32(q & 15) - m0
                dst[yo + 32 + l] = d1 * np.float32(q >> 4) - m1


@njit(**JIT)
def dequant_q5_k(src, dst, tab):
    """Q5_K: 176 B = f16 d + f16 dmin + scales[12] + qh[32] + qs[128]; as Q4_K, 5th bit = bit k of qh[l]."""
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 256):
        o, y = 176 * b, 256 * b
        d, dmin = _h(src, o, tab), _h(src, o + 2, tab)
        for g in range(4):
            sc0, mn0 = _scale_min_k4(src, o + 4, 2 * g)
            sc1, mn1 = _scale_min_k4(src, o + 4, 2 * g + 1)
            d0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
            d1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
            qo, yo = o + 48 + 32 * g, y + 64 * g
            for l in range(n32):
                q = np.int32(src[qo + l])
                qh = np.int32(src[o + 16 + l])
                dst[yo + l] = d0 * np.float32((q & 15) | (((qh >> (2 * g)) & 1) << 4)) - m0
                dst[yo + 32 + l] = d1 * np.float32((q >> 4) | (((qh >> (2 * g + 1)) & 1) << 4)) - m1


@njit(**JIT)
def _i8(src, o):
    q = np.int32(src[o])
    return q - ((q >> 7) << 8)


@njit(**JIT)
def dequant_q6_k(src, dst, tab):
    """Q6_K: 210 B = ql[128] + qh[64] + int8 scales[16] + f16 d; 16 sub-blocks of 16, value = 6 bits - 32.

    Half h reads ql[64h:], qh[32h:], scales[8h:]; for l = 0..31 it yields four weights (llama.cpp order):
    y[128h+l]    = lo(ql[l])    | (qh[l] & 3) << 4        scale sc[2*0 + l//16]
    y[128h+l+32] = lo(ql[l+32]) | (qh[l] >> 2 & 3) << 4   scale sc[2*1 + l//16]
    y[128h+l+64] = hi(ql[l])    | (qh[l] >> 4 & 3) << 4   scale sc[2*2 + l//16]
    y[128h+l+96] = hi(ql[l+32]) | (qh[l] >> 6 & 3) << 4   scale sc[2*3 + l//16]   (each minus 32)
    """
    n32 = _n(32, tab)
    for b in range(dst.shape[0] // 256):
        o, y = 210 * b, 256 * b
        d = _h(src, o + 208, tab)
        for h in range(2):
            lo_, ho_, so, yo = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, y + 128 * h
            s0, s1, s2, s3 = d * _i8(src, so), d * _i8(src, so + 1), d * _i8(src, so + 2), d * _i8(src, so + 3)
            s4, s5, s6, s7 = d * _i8(src, so + 4), d * _i8(src, so + 5), d * _i8(src, so + 6), d * _i8(src, so + 7)
            for l in range(n32):
                a, c = np.int32(src[lo_ + l]), np.int32(src[lo_ + l + 32])
                qh = np.int32(src[ho_ + l])
                first = l < 16
                dst[yo + l] = (s0 if first else s1) * np.float32(((a & 15) | ((qh & 3) << 4)) - 32)
                dst[yo + l + 32] = (s2 if first else s3) * np.float32(((c & 15) | (((qh >> 2) & 3) << 4)) - 32)
                dst[yo + l + 64] = (s4 if first else s5) * np.float32(((a >> 4) | (((qh >> 4) & 3) << 4)) - 32)
                dst[yo + l + 96] = (s6 if first else s7) * np.float32(((c >> 4) | (((qh >> 6) & 3) << 4)) - 32)


class TypeId(int):
    """A GGML type id that Numba types as a compile-time constant (Literal[int]).

    Kernels take the weight type as a TypeId, so each (kernel, type) pair is compiled on first use and contains
    only that type's dequantizer: a q4_K_M model compiles Q4_K and Q6_K code, not all twelve types (first-start
    compile time), and the compiled code is cached on disk per type.
    """

    def __repr__(self) -> str:
        return f"TypeId({GGMLType(int(self)).name})"


@typeof_impl.register(TypeId)
def _typeof_type_id(val, c):
    return types.literal(int(val))


_DEQUANT_BY_ID = {
    0: dequant_f32, 1: dequant_f16, 2: dequant_q4_0, 3: dequant_q4_1, 6: dequant_q5_0, 7: dequant_q5_1,
    8: dequant_q8_0, 10: dequant_q2_k, 11: dequant_q3_k, 12: dequant_q4_k, 13: dequant_q5_k, 14: dequant_q6_k,
}


def dequant_row(ttype, src, dst, tab):
    """dst[:] = the weights held by the first blocks of src, for GGML type `ttype` (a TypeId).

    Jitted code only: resolved at compile time to the one per-type dequantizer.
    """
    raise NotImplementedError("dequant_row is called from jitted kernels only")


@overload(dequant_row, prefer_literal=True, jit_options=JIT)
def _dequant_row_impl(ttype, src, dst, tab):
    if not isinstance(ttype, types.IntegerLiteral):
        raise TypingError("dequant kernels take the tensor type as a dequant.TypeId (a compile-time constant)")
    fn = _DEQUANT_BY_ID.get(ttype.literal_value)
    if fn is None:
        raise TypingError(f"no dequantizer for GGML type {ttype.literal_value}")

    def impl(ttype, src, dst, tab):
        fn(src, dst, tab)
    return impl


# ---- kernels built on dequant_row ----

@njit(**JIT_PARALLEL)
def dequant_rows(w, ttype, rows, out, tab):
    """out[i, :] = dequantized row rows[i] of w (uint8 [n_rows, row_bytes]); the embedding lookup."""
    for i in prange(rows.shape[0]):
        dequant_row(ttype, w[rows[i]], out[i], tab)


@njit(**JIT_PARALLEL)
def matvec_f32(w, ttype, x, out, tab, rows_per_chunk):
    """out[r] = dot(dequant(w[r]), x) for every row r; float32 accumulation.

    w: uint8 [n_rows, row_bytes] raw blocks; x: float32 [n_cols]; out: float32 [n_rows].
    Chunks of rows are spread over the threads; each chunk dequantizes one row at a time into its scratch.
    """
    n_rows, n_cols = w.shape[0], x.shape[0]
    n_chunks = (n_rows + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(n_chunks):
        buf = np.empty(n_cols, np.float32)
        for r in range(c * rows_per_chunk, min((c + 1) * rows_per_chunk, n_rows)):
            dequant_row(ttype, w[r], buf, tab)
            acc = np.float32(0.0)
            for i in range(n_cols):
                acc += buf[i] * x[i]
            out[r] = acc


@njit(**JIT_PARALLEL)
def matmat_f32(w, ttype, x, out, tab, rows_per_chunk):
    """out[t, r] = dot(dequant(w[r]), x[t]) for all tokens t and rows r (prompt batches).

    x: float32 [n_tok, n_cols]; out: float32 [n_tok, n_rows]. Each chunk dequantizes its rows once into an
    f32 tile and reuses it for every token, four tokens at a time so each weight load feeds four products.
    Every (t, r) is the same float32 sum as matvec_f32 computes, in the same order.
    """
    n_rows, n_tok, n_cols = w.shape[0], x.shape[0], x.shape[1]
    n_chunks = (n_rows + rows_per_chunk - 1) // rows_per_chunk
    for c in prange(n_chunks):
        r0 = c * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, n_rows)
        tile = np.empty((r1 - r0, n_cols), np.float32)
        for r in range(r0, r1):
            dequant_row(ttype, w[r], tile[r - r0], tab)
        t = 0
        while t + 4 <= n_tok:
            x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
            for r in range(r0, r1):
                wr = tile[r - r0]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for i in range(n_cols):
                    wi = wr[i]
                    a0 += wi * x0[i]
                    a1 += wi * x1[i]
                    a2 += wi * x2[i]
                    a3 += wi * x3[i]
                out[t, r] = a0
                out[t + 1, r] = a1
                out[t + 2, r] = a2
                out[t + 3, r] = a3
            t += 4
        for t in range(t, n_tok):                    # the last n_tok % 4 tokens
            xt = x[t]
            for r in range(r0, r1):
                wr = tile[r - r0]
                acc = np.float32(0.0)
                for i in range(n_cols):
                    acc += wr[i] * xt[i]
                out[t, r] = acc


def as_rows(data: np.ndarray, ggml_type: int, n_rows: int, n_cols: int) -> np.ndarray:
    """The raw bytes of a 2-D tensor as uint8 [n_rows, row_bytes] (a view, no copy)."""
    per_block, nbytes = BLOCK[GGMLType(int(ggml_type))]
    row_bytes = n_cols // per_block * nbytes
    return np.asarray(data).reshape(-1).view(np.uint8)[: n_rows * row_bytes].reshape(n_rows, row_bytes)


def dequantize(data: np.ndarray, ggml_type: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Dequantize a whole [n_rows, n_cols] tensor (1-D tensors: n_rows = 1) to float32 with the Numba kernels."""
    w = as_rows(data, ggml_type, n_rows, n_cols)
    out = np.empty((n_rows, n_cols), np.float32)
    dequant_rows(w, TypeId(ggml_type), np.arange(n_rows, dtype=np.int64), out, _F16_TABLE)
    return out
