"""The quantized KV cache: keys and values stored as q8_0 or q4_0 blocks, exactly as llama.cpp quantizes them, and
attention that reads those blocks directly, as llama.cpp's CPU flash attention does (ggml-cpu.c
`ggml_compute_forward_flash_attn_ext_f16`, llama.cpp c392e50).

Row layout. A cache row is one kv head's key (or value) at one position: `head_dim` values stored as bytes (uint8):
* q8_0: `head_dim` signed quants in order, then the `head_dim / 32` block scales d as fp16;
* q4_0: `head_dim / 2` bytes of 4-bit quants, 16 per block in ggml's order (byte j of a block holds element j in its
  low nibble, element j + 16 in its high one), then the block scales as fp16;
* f16: `head_dim` fp16 values (the flash-attention kernel reads an f16 K or V beside a quantized one).
The bytes per value are ggml's (34 and 18 bytes per 32 values: 0.53 and 0.28 of f16). Only the scales sit at the end
of the row instead of before each block, so that the quants of two (q8_0) or four (q4_0) blocks are one 64-byte load.

Storing a row quantizes it as llama.cpp's `ggml_cpy` of the new keys/values into its cache does on x86:
* q8_0: ggml-cpu's `quantize_row_q8_0`, its AVX2 form: amax = max|x|, d = amax / 127, q = round-half-even(x * (127 /
  amax)), d stored as fp16. (ggml's portable `quantize_row_q8_0_ref` rounds halves away from zero and multiplies by
  1 / d: a few quants per million differ by one.)
* q4_0: `quantize_row_q4_0_ref`, which ggml-cpu calls on every ISA: max = the element of largest magnitude (sign kept,
  the first on a tie), d = max / -8, q = min(15, trunc(x * (1 / d) + 8.5)).

Attention with a quantized K or V, as ggml_compute_forward_flash_attn_ext_f16:
* q is converted to K's `vec_dot_type`: Q8_0 (the q8_0 quantizer above) for q8_0 and q4_0 keys, fp16 for f16 keys;
* a score is that type's vec_dot: per block the integer dot product of the quants times d_k * d_q (both fp16), summed
  in float32; then times 1 / sqrt(head_dim);
* the softmax does not round the probabilities (llama.cpp's online softmax; here two passes: the maximum, then the
  exps, which is the same sum up to float32 rounding);
* values are dequantized (d * q, d * (q - 8)) and summed in float32, and divided by the sum of the exps at the end.
  (With an f16 V cache llama.cpp sums the weighted values in fp16, `ggml_vec_mad_f16`; here in float32 as for the
  quantized types.)
A cache that is f16 for both K and V takes kernels/ops.py's attention instead: llama.cpp's default path without flash
attention, which rounds q and the probabilities to fp16.

`*_ref` functions are the plain-numpy definitions the Numba kernels are tested against.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange
from numba.extending import intrinsic

from . import JIT, JIT_PARALLEL, simd
from .ops import exp_sum, rope, tile_dot8, tile_exp
from .q8 import JITQ
from .simd import (cvt, dot_s8s8, dpbusd, fabs_v, fadd, fma, fmul, hmax_f, hsum_f, hsum_i, load_f, load_h1,
                   load_h2_bcast8, load_h4_bcast4, load_h16, load_i, load_i8x16, load_i_dup128, load_i_dup256,
                   load_u8x16, rint_i, round_h1, round_h16, splat_f, splat_i, store_b16, store_f, store_h1, store_h16,
                   vadd, vand, vmax_f, vmin_i, vor, vshl, vshr, vsub)

F16, Q4_0, Q8_0 = 1, 2, 8          # ggml's type numbers
TYPES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
QK = 32                            # values per block
TILE = 16                          # query tokens that share one pass over the keys


def row_bytes(t: int, head_dim: int) -> int:
    """Bytes of one cache row (one kv head at one position) of type t."""
    if t == F16:
        return 2 * head_dim
    if head_dim % QK:
        raise ValueError(f"a {type_name(t)} cache needs a head size that is a multiple of {QK}, not {head_dim}")
    if t == Q8_0:
        return head_dim + 2 * (head_dim // QK)
    if t == Q4_0:
        return head_dim // 2 + 2 * (head_dim // QK)
    raise ValueError(f"unknown KV cache type {t}")


def type_name(t: int) -> str:
    return {v: k for k, v in TYPES.items()}.get(t, str(t))


def _quant_bytes(t, head_dim):
    """Offset of the block scales in a row (= bytes of quants)."""
    return head_dim if t == Q8_0 else head_dim // 2


# --------------------------------------------------------------------------------------------- numpy definitions
def quantize_ref(x: np.ndarray, t: int) -> np.ndarray:
    """float32 [..., head_dim] -> rows uint8 [..., row_bytes] (see the module doc)."""
    x = np.asarray(x, np.float32)
    hd = x.shape[-1]
    if t == F16:
        return x.astype(np.float16).view(np.uint8)
    xb = x.reshape(*x.shape[:-1], hd // QK, QK)
    if t == Q8_0:
        amax = np.abs(xb).max(axis=-1, keepdims=True)
        d = amax / np.float32(127)
        inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
        qs = np.rint(xb * inv).astype(np.int8).view(np.uint8).reshape(*x.shape[:-1], hd)
    else:
        i = np.abs(xb).argmax(axis=-1)[..., None]                 # the first of equal magnitudes, as ggml's `<`
        d = np.take_along_axis(xb, i, axis=-1) / np.float32(-8)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        q = np.minimum(15, np.trunc((xb * inv) + np.float32(8.5))).astype(np.uint8)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(*x.shape[:-1], hd // 2)
    return np.concatenate([qs, d[..., 0].astype(np.float16).view(np.uint8)], axis=-1)


def dequantize_ref(rows: np.ndarray, t: int, head_dim: int) -> np.ndarray:
    """rows uint8 [..., row_bytes] -> float32 [..., head_dim]."""
    rows = np.ascontiguousarray(rows)
    if t == F16:
        return rows.view(np.float16).astype(np.float32)
    qb, nb = _quant_bytes(t, head_dim), head_dim // QK
    d = rows[..., qb:].copy().view(np.float16).astype(np.float32)[..., None]
    if t == Q8_0:
        q = rows[..., :qb].view(np.int8).reshape(*rows.shape[:-1], nb, QK).astype(np.float32)
    else:
        p = rows[..., :qb].reshape(*rows.shape[:-1], nb, 16)
        q = np.concatenate([p & 15, p >> 4], axis=-1).astype(np.float32) - 8
    return (d * q).reshape(*rows.shape[:-1], head_dim)


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, type_k: int, type_v: int) -> np.ndarray:
    """llama.cpp's flash attention over cache rows (the module doc), in float64 after the quantization steps.

    q: float32 [n_tok, n_head, head_dim] at positions n_past..; k, v: rows [n_past + n_tok, n_head_kv, row_bytes].
    Returns float32 [n_tok, n_head, head_dim]."""
    n_tok, n_head, hd = q.shape
    n_gqa = n_head // k.shape[1]
    kf, vf = dequantize_ref(k, type_k, hd).astype(np.float64), dequantize_ref(v, type_v, hd).astype(np.float64)
    if type_k == F16:
        qv = q.astype(np.float16).astype(np.float64)
    else:
        qv = dequantize_ref(quantize_ref(q, Q8_0), Q8_0, hd).astype(np.float64)
    out = np.empty(q.shape, np.float32)
    for t in range(n_tok):
        n_kv = n_past + t + 1
        for h in range(n_head):
            s = kf[:n_kv, h // n_gqa] @ qv[t, h] / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = p @ vf[:n_kv, h // n_gqa] / p.sum()
    return out


# --------------------------------------------------------------------------------------------- storing rows
@numba.jit(**JITQ)
def _f16_bits(x):
    """float32 -> fp16 bits, round half to even, overflow to inf (as vcvtps2ph); the portable kernels' scale store."""
    b = np.int64(np.float32(x).view(np.uint32))
    sign = (b >> 16) & 0x8000
    mag = b & 0x7FFFFFFF
    if mag > 0x7F800000:
        return np.uint16(sign | 0x7E00)
    if mag >= 0x477FF000:
        return np.uint16(sign | 0x7C00)
    if mag >= 0x38800000:
        mag = mag + 0xFFF + ((mag >> 13) & 1)
        return np.uint16(sign | ((mag - 0x38000000) >> 13))
    return np.uint16(sign | np.int64(np.rint(np.float64(abs(x)) * 16777216.0)))


@numba.jit(**JITQ)
def quantize_row(x, t, row):
    """One row, element by element: x float32 [head_dim] -> row uint8 [row_bytes] (the portable kernel)."""
    hd = x.shape[0]
    if t == F16:
        for i in range(hd):
            h = _f16_bits(x[i])
            row[2 * i], row[2 * i + 1] = h & 0xFF, h >> 8
        return
    qb = hd if t == Q8_0 else hd // 2
    for b in range(hd // QK):
        o = b * QK
        if t == Q8_0:
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[o + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
            for j in range(QK):
                row[o + j] = np.uint8(np.int64(np.rint(x[o + j] * inv)) & 0xFF)
        else:
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(QK):
                if amax < abs(x[o + j]):
                    amax = abs(x[o + j])
                    mx = x[o + j]
            d = mx / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
            for j in range(16):
                lo = min(15, np.int64(x[o + j] * inv + np.float32(8.5)))
                hi = min(15, np.int64(x[o + 16 + j] * inv + np.float32(8.5)))
                row[b * 16 + j] = np.uint8(lo | (hi << 4))
        h = _f16_bits(d)
        row[qb + 2 * b], row[qb + 2 * b + 1] = h & 0xFF, h >> 8


@numba.jit(**JITQ)
def quantize_row_simd(x, xo, hd, t, row, ro):
    """quantize_row on 16-float vectors, bit for bit: x[xo:xo+hd] (x: float32, flat) -> the row at byte ro of `row`
    (any C-contiguous uint8 array). Needs simd.ISA != 'none'."""
    if t == F16:
        for c in range(hd // 16):
            store_h16(row, ro + 32 * c, load_f(x, xo + 16 * c))
        return
    qb = hd if t == Q8_0 else hd // 2
    c15, c8 = splat_i(15), splat_f(8.5)
    for b in range(hd // QK):
        v0, v1 = load_f(x, xo + b * QK), load_f(x, xo + b * QK + 16)
        if t == Q8_0:
            amax = hmax_f(vmax_f(fabs_v(v0), fabs_v(v1)))
            d = amax / np.float32(127.0)
            inv = splat_f(np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0))
            store_b16(row, ro + b * QK, rint_i(fmul(v0, inv)))
            store_b16(row, ro + b * QK + 16, rint_i(fmul(v1, inv)))
        else:
            mx = _signed_max32(x, xo + b * QK)
            d = mx / np.float32(-8.0)
            inv = splat_f(np.float32(1.0) / d if d != 0.0 else np.float32(0.0))
            lo = vmin_i(_trunc_i(fadd(fmul(v0, inv), c8)), c15)
            hi = vmin_i(_trunc_i(fadd(fmul(v1, inv), c8)), c15)
            store_b16(row, ro + b * 16, vor(lo, vshl(hi, 4)))
        store_h1(row, ro + qb + 2 * b, d)


@numba.jit(**JITQ)
def _signed_max32(x, o):
    """The element of x[o:o+32] of largest magnitude, sign kept, the first one on a tie (quantize_row_q4_0_ref)."""
    a = hmax_f(vmax_f(fabs_v(load_f(x, o)), fabs_v(load_f(x, o + 16))))
    for j in range(QK):
        if abs(x[o + j]) == a:
            return x[o + j]
    return np.float32(0.0)


@intrinsic
def _trunc_i(typingctx, a):
    """Float lanes truncated toward zero to i32 lanes (C's cast)."""
    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], simd._VI)
    return simd.I512(a), codegen


@numba.jit(**JITQ)
def store_rows(x, cache, n_past, t):
    """cache[g, n_past + i] = the row of x[i, g] quantized to type t. x: float32 [n, n_head_kv, head_dim]
    (C-contiguous); cache: uint8 [n_head_kv, n_ctx, row_bytes]."""
    n, g_n, hd = x.shape
    xf = x.reshape(x.size)
    for i in range(n):
        for g in range(g_n):
            if simd.ISA != "none" and hd % 16 == 0:
                quantize_row_simd(xf, (i * g_n + g) * hd, hd, t, cache[g], (n_past + i) * cache.shape[2])
            else:
                quantize_row(x[i, g], t, cache[g, n_past + i])


@numba.jit(**JITQ)
def rope_store(q, k, v, pos, n_rot, freq_base, freq_scale, kc, vc, n_past, tk, tv, freq_factors=None):
    """RoPE on q and k (float32 [n, heads, head_dim], in place; ops.rope), then k and v stored as rows of types
    tk / tv at positions n_past.. of kc, vc (uint8 [n_head_kv, n_ctx, row_bytes]; an f16 cache viewed as bytes):
    one Numba call per layer, as ops.rope_kv for the f16 cache."""
    rope(q, pos, n_rot, freq_base, freq_scale, freq_factors)
    rope(k, pos, n_rot, freq_base, freq_scale, freq_factors)
    store_rows(k, kc, n_past, tk)
    store_rows(v, vc, n_past, tv)


@numba.jit(**JITQ)
def dequantize_rows(rows, t, out):
    """rows uint8 [m, row_bytes] -> out float32 [m, head_dim] (the context shift: dequantize, rotate, requantize);
    d * q exactly as ggml's dequantize_row_q8_0 / _q4_0."""
    hd = out.shape[1]
    if simd.ISA != "none" and hd % QK == 0:
        for i in range(rows.shape[0]):
            _row_f32(rows, i * rows.shape[1], t, hd, True, out, i * hd, out, 0)
        return
    qb = hd if t == Q8_0 else hd // 2
    for i in range(rows.shape[0]):
        r = rows[i]
        if t == F16:
            for j in range(hd):
                out[i, j] = _half(r, 2 * j)
            continue
        for b in range(hd // QK):
            d = _half(r, qb + 2 * b)
            for j in range(QK):
                out[i, b * QK + j] = d * np.float32(_quant(r, t, b, j))


@numba.jit(**JITQ)
def quantize_rows(x, t, rows):
    """x float32 [m, head_dim] -> rows uint8 [m, row_bytes]."""
    for i in range(x.shape[0]):
        if simd.ISA != "none" and x.shape[1] % 16 == 0:
            quantize_row_simd(x.reshape(x.size), i * x.shape[1], x.shape[1], t, rows, i * rows.shape[1])
        else:
            quantize_row(x[i], t, rows[i])


@numba.jit(**JITQ)
def _quant(r, t, b, j):
    """The integer value of element j of block b in row r: q8_0's quant, q4_0's nibble - 8 (portable kernels)."""
    if t == Q8_0:
        return np.int32(np.int8(r[b * QK + j]))
    byte = np.int32(r[b * 16 + j % 16])
    return (byte & 15 if j < 16 else byte >> 4) - 8


@numba.jit(**JITQ)
def _half(r, o):
    """The fp16 value stored little-endian at bytes o, o+1 of r, as float32."""
    h = np.int32(r[o]) | (np.int32(r[o + 1]) << 8)
    bits = np.uint32(((h & 0x7FFF) << 13) | ((h & 0x8000) << 16))
    return bits.view(np.float32) * np.float32(5.192296858534828e33)


# --------------------------------------------------------------------------------------------- attention
def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, out: np.ndarray,
              type_k: int, type_v: int) -> None:
    """Causal grouped-query attention over cache rows of types type_k / type_v (see the module doc).

    q: float32 [n_tok, n_head, head_dim] (roped), at positions n_past .. n_past+n_tok-1; k_cache, v_cache: one
    layer's rows [n_head_kv, n_ctx, row_bytes] uint8 (an f16 cache may also come as uint16 [n_head_kv, n_ctx,
    head_dim]); out: float32 [n_tok, n_head * head_dim]."""
    kc = k_cache.view(np.uint8) if k_cache.dtype != np.uint8 else k_cache
    vc = v_cache.view(np.uint8) if v_cache.dtype != np.uint8 else v_cache
    if q.shape[2] % QK:
        raise ValueError(f"quantized-cache attention needs a head size that is a multiple of {QK}, not {q.shape[2]}")
    if simd.ISA != "none":
        attention_simd(q, kc, vc, n_past, out, type_k, type_v)
    else:
        attention_rows(q, kc, vc, n_past, out, type_k, type_v)


@numba.jit(**JITQ)
def _q_rows(x, t, qi, qd):
    """One query head's row x [head_dim] in K's vec_dot form, portable: t = F16: qd = x rounded to fp16; else Q8_0:
    qi = the quants, qd[b] = the blocks' fp16 scales."""
    hd = x.shape[0]
    if t == F16:
        for i in range(hd):
            qd[i] = _half_of(_f16_bits(x[i]))
        return
    for b in range(hd // QK):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b * QK + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
        for j in range(QK):
            qi[b * QK + j] = np.int32(np.rint(x[b * QK + j] * inv))
        qd[b] = _half_of(_f16_bits(d))


@numba.jit(**JITQ)
def _half_of(h):
    bits = np.uint32(((np.int32(h) & 0x7FFF) << 13) | ((np.int32(h) & 0x8000) << 16))
    return bits.view(np.float32) * np.float32(5.192296858534828e33)


@numba.jit(**JIT_PARALLEL)
def attention_rows(q, kc, vc, n_past, out, tk, tv):
    """The portable kernel (no SIMD): one (token, query head) per work item, element loops."""
    n_tok, n_head, hd = q.shape
    n_gqa = n_head // kc.shape[0]
    scale = np.float32(1.0 / math.sqrt(hd))
    nb = hd // QK
    qbk = hd if tk == Q8_0 else hd // 2
    qbv = hd if tv == Q8_0 else hd // 2
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        n_kv = n_past + t + 1
        kh, vh = kc[h // n_gqa], vc[h // n_gqa]
        qi = np.zeros(hd, np.int32)
        qd = np.zeros(hd, np.float32)
        _q_rows(q[t, h], tk, qi, qd)
        s = np.empty(n_kv, np.float32)
        for j in range(n_kv):
            r = kh[j]
            acc = np.float32(0.0)
            if tk == F16:
                for i in range(hd):
                    acc += qd[i] * _half(r, 2 * i)
            else:
                for b in range(nb):
                    isum = 0
                    for i in range(QK):
                        isum += _quant(r, tk, b, i) * qi[b * QK + i]
                    acc += np.float32(isum) * (_half(r, qbk + 2 * b) * qd[b])
            s[j] = acc * scale
        mx = s.max()
        total = np.float32(0.0)
        for j in range(n_kv):
            s[j] = np.float32(math.exp(s[j] - mx))
            total += s[j]
        o = out[t, h * hd:(h + 1) * hd]
        o[:] = 0.0
        for j in range(n_kv):
            r = vh[j]
            for b in range(nb):
                pd = s[j] if tv == F16 else s[j] * _half(r, qbv + 2 * b)
                for i in range(QK):
                    x = _half(r, 2 * (b * QK + i)) if tv == F16 else np.float32(_quant(r, tv, b, i))
                    o[b * QK + i] += pd * x
        inv = np.float32(1.0) / total
        for i in range(hd):
            o[i] *= inv


# ---- SIMD: Q in K's vec_dot form, laid out to meet 64-byte loads of the key rows.
# q8_0 keys: a group of 4 blocks is two loads of 64 quants; lane l of a dot_s8s8 holds 4 products of block 2c + l // 8,
#   so the scales go in as two vectors, (d0 x8, d1 x8) and (d2 x8, d3 x8). Q's quants: in order.
# q4_0 keys: a group of 4 blocks is one load of 64 packed bytes; its low nibbles are elements 0-15 of each block, the
#   high ones elements 16-31, so Q is stored as [elements 0-15 of blocks 0..3][elements 16-31 of blocks 0..3] (the
#   legacy "nibble order" of kernels/q8.py) and lanes 4b..4b+3 hold block b: the scales are one vector (d_b x4), and the
#   -8 offset enters as -2 * sum(q_b) in each of those 4 lanes.
# Blocks after the last whole group (head_dim % 128) are single "tail" blocks: their Q quants padded with zeros to a
#   whole vector (64 or 128 bytes), the key block loaded repeated (load_i_dup256 / load_i_dup128), summed as scalars.
@numba.jit(**JITQ)
def _q_prep(x, xo, hd, tk, Qi, qo, DQ, do, BI, DT, BT, to):
    """One query head (x[xo:xo+hd]) -> Qi[qo..] (quants, layout above), DQ[do..] (group scale vectors), BI[do..]
    (q4_0: group offset sums), DT[to..], BT[to..] (tail blocks' scale and -8 * sum)."""
    ng = hd // 128
    for b in range(hd // QK):
        v0, v1 = load_f(x, xo + b * QK), load_f(x, xo + b * QK + 16)
        amax = hmax_f(vmax_f(fabs_v(v0), fabs_v(v1)))
        d = amax / np.float32(127.0)
        inv = splat_f(np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0))
        q0, q1 = rint_i(fmul(v0, inv)), rint_i(fmul(v1, inv))
        s = hsum_i(vadd(q0, q1))
        dr = round_h1(d)
        g, bb = b // 4, b % 4
        if g < ng:
            if tk == Q8_0:
                store_b16(Qi, qo + b * QK, q0)
                store_b16(Qi, qo + b * QK + 16, q1)
                for lane in range(8):
                    DQ[do + 32 * g + 8 * bb + lane] = dr
            else:
                store_b16(Qi, qo + 128 * g + 16 * bb, q0)
                store_b16(Qi, qo + 128 * g + 64 + 16 * bb, q1)
                for lane in range(4):
                    DQ[do + 16 * g + 4 * bb + lane] = dr
                    BI[do + 16 * g + 4 * bb + lane] = -2 * s
        else:
            tb = b - 4 * ng
            z = splat_i(0)
            if tk == Q8_0:
                o = qo + 128 * ng + 64 * tb
                store_b16(Qi, o, q0)
                store_b16(Qi, o + 16, q1)
                store_b16(Qi, o + 32, z)
                store_b16(Qi, o + 48, z)
            else:
                o = qo + 128 * ng + 128 * tb
                store_b16(Qi, o, q0)
                store_b16(Qi, o + 64, q1)
                for k in (16, 32, 48, 80, 96, 112):
                    store_b16(Qi, o + k, z)
            DT[to + tb] = dr
            BT[to + tb] = -8 * s


@numba.jit(**JIT, inline='always')
def _score_q8(Qi, qo, DQ, do, DT, to, kh, ro, hd):
    """Dot of one Q8_0 query row with the q8_0 key row at byte ro of kh (unscaled)."""
    ng = hd // 128
    z = splat_i(0)
    f = splat_f(0.0)
    for g in range(ng):
        a0 = dot_s8s8(z, load_i(Qi, qo + 128 * g), load_i(kh, ro + 128 * g))
        a1 = dot_s8s8(z, load_i(Qi, qo + 128 * g + 64), load_i(kh, ro + 128 * g + 64))
        f = fma(cvt(a0), fmul(load_h2_bcast8(kh, ro + hd + 8 * g), load_f(DQ, do + 32 * g)), f)
        f = fma(cvt(a1), fmul(load_h2_bcast8(kh, ro + hd + 8 * g + 4), load_f(DQ, do + 32 * g + 16)), f)
    s = hsum_f(f)
    for tb in range(hd // QK - 4 * ng):
        b = 4 * ng + tb
        a = dot_s8s8(z, load_i(Qi, qo + 128 * ng + 64 * tb), load_i_dup256(kh, ro + QK * b))
        s += np.float32(hsum_i(a)) * (load_h1(kh, ro + hd + 2 * b) * DT[to + tb])
    return s


@numba.jit(**JIT, inline='always')
def _score_q4(Qi, qo, DQ, BI, do, DT, BT, to, kh, ro, hd):
    """Dot of one Q8_0 query row with the q4_0 key row at byte ro of kh (unscaled)."""
    ng = hd // 128
    qb = hd // 2
    m4 = splat_i(0x0F0F0F0F)
    f = splat_f(0.0)
    for g in range(ng):
        kb = load_i(kh, ro + 64 * g)
        a = dpbusd(load_i(BI, do + 16 * g), vand(kb, m4), load_i(Qi, qo + 128 * g))
        a = dpbusd(a, vand(vshr(kb, 4), m4), load_i(Qi, qo + 128 * g + 64))
        f = fma(cvt(a), fmul(load_h4_bcast4(kh, ro + qb + 8 * g), load_f(DQ, do + 16 * g)), f)
    s = hsum_f(f)
    z = splat_i(0)
    for tb in range(hd // QK - 4 * ng):
        b = 4 * ng + tb
        kb = load_i_dup128(kh, ro + 16 * b)
        o = qo + 128 * ng + 128 * tb
        a = dpbusd(dpbusd(z, vand(kb, m4), load_i(Qi, o)), vand(vshr(kb, 4), m4), load_i(Qi, o + 64))
        s += np.float32(hsum_i(a) + BT[to + tb]) * (load_h1(kh, ro + qb + 2 * b) * DT[to + tb])
    return s


@numba.jit(**JIT, inline='always')
def _score_f16(Qf, qo, kh, ro, hd):
    """Dot of one fp16-rounded query row with the f16 key row at byte ro of kh."""
    f = splat_f(0.0)
    for c in range(hd // 16):
        f = fma(load_f(Qf, qo + 16 * c), load_h16(kh, ro + 32 * c), f)
    return hsum_f(f)


@numba.jit(**JIT, inline='always')
def _v16(vh, r, c, tv):
    """Values c*16 .. c*16+15 of the row at byte r of vh as floats; a quantized row without its scale."""
    if tv == F16:
        return load_h16(vh, r + 32 * c)
    if tv == Q8_0:
        return cvt(load_i8x16(vh, r + 16 * c))
    raw = load_u8x16(vh, r + 16 * (c // 2))
    return cvt(vsub(vand(raw, splat_i(15)) if c % 2 == 0 else vshr(raw, 4), splat_i(8)))


@numba.jit(**JIT, inline='always')
def _pv_rows(p, n, vh, rb, tv, hd, o, inv):
    """o[:hd] = inv * sum_j<n p[j] v_j over the value rows of vh (row stride rb bytes). 128 columns at a time in
    8 vector sums, each row read once in order; a quantized row's block scale joins p first (p[j] * d_jb)."""
    qb = hd if tv == Q8_0 else hd // 2
    vi = splat_f(inv)
    for c0 in range(0, hd - hd % 128, 128):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat_f(0.0)
        c, b = c0 // 16, c0 // QK
        for j in range(n):
            r = j * rb
            if tv == F16:
                w0 = w1 = w2 = w3 = splat_f(p[j])
            else:
                s0 = r + qb + 2 * b
                w0, w1 = splat_f(p[j] * load_h1(vh, s0)), splat_f(p[j] * load_h1(vh, s0 + 2))
                w2, w3 = splat_f(p[j] * load_h1(vh, s0 + 4)), splat_f(p[j] * load_h1(vh, s0 + 6))
            a0, a1 = fma(w0, _v16(vh, r, c, tv), a0), fma(w0, _v16(vh, r, c + 1, tv), a1)
            a2, a3 = fma(w1, _v16(vh, r, c + 2, tv), a2), fma(w1, _v16(vh, r, c + 3, tv), a3)
            a4, a5 = fma(w2, _v16(vh, r, c + 4, tv), a4), fma(w2, _v16(vh, r, c + 5, tv), a5)
            a6, a7 = fma(w3, _v16(vh, r, c + 6, tv), a6), fma(w3, _v16(vh, r, c + 7, tv), a7)
        for k, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
            store_f(o, c0 + 16 * k, fmul(a, vi))
    for b in range(4 * (hd // 128), hd // QK):       # blocks after the last 128 columns, two vectors each
        a0 = a1 = splat_f(0.0)
        for j in range(n):
            r = j * rb
            w = splat_f(p[j] if tv == F16 else p[j] * load_h1(vh, r + qb + 2 * b))
            a0, a1 = fma(w, _v16(vh, r, 2 * b, tv), a0), fma(w, _v16(vh, r, 2 * b + 1, tv), a1)
        store_f(o, QK * b, fmul(a0, vi))
        store_f(o, QK * b + 16, fmul(a1, vi))


@numba.jit(**JIT)
def _row_f32(arr, r, t, hd, scaled, dst, do, ds, dso):
    """The row at byte r of arr as floats into dst[do:do+hd]: with `scaled`, its values (d * q exactly as ggml's
    dequantize_row); else the bare quants (q, q - 8) and the block scales into ds[dso:dso+hd/32] (f16: the values)."""
    qb = hd if t == Q8_0 else hd // 2
    for b in range(hd // QK):
        if t == F16:
            v0, v1 = load_h16(arr, r + 64 * b), load_h16(arr, r + 64 * b + 32)
        else:
            v0, v1 = _v16(arr, r, 2 * b, t), _v16(arr, r, 2 * b + 1, t)
            d = load_h1(arr, r + qb + 2 * b)
            if scaled:
                v0, v1 = fmul(v0, splat_f(d)), fmul(v1, splat_f(d))
            else:
                ds[dso + b] = d
        store_f(dst, do + QK * b, v0)
        store_f(dst, do + QK * b + 16, v1)


@numba.jit(**JITQ)
def _q_f32(x, xo, hd, tk, qr, dq):
    """One query head x[xo:xo+hd] in K's vec_dot form as floats: tk = F16: qr = x rounded to fp16; else the Q8_0
    quants (integers) in qr and the blocks' fp16 scales in dq (the same numbers as _q_prep)."""
    for b in range(hd // QK):
        v0, v1 = load_f(x, xo + b * QK), load_f(x, xo + b * QK + 16)
        if tk == F16:
            store_f(qr, QK * b, round_h16(v0))
            store_f(qr, QK * b + 16, round_h16(v1))
            continue
        amax = hmax_f(vmax_f(fabs_v(v0), fabs_v(v1)))
        inv = splat_f(np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0))
        store_f(qr, QK * b, cvt(rint_i(fmul(v0, inv))))
        store_f(qr, QK * b + 16, cvt(rint_i(fmul(v1, inv))))
        dq[b] = round_h1(amax / np.float32(127.0))


@numba.jit(**JIT)
def _fa_tile128(q, kh, vh, n_past, t0, m, h, scale, out, tk, tv):
    """One query head, tokens t0 .. t0+m-1 (8 <= m <= 16), head_dim 128: kernels/ops.py's _attention_tile128 with
    quantized rows. Scores transposed (lane tt of ST[j] = token t0+tt, key j), 8 keys at a time: the keys are
    widened to floats (the bare quants) and meet Q stored transposed as floats (its Q8_0 quants); per block the 32
    products of integers sum exactly in float32, so a block's sum is the integer dot product of ggml's vec_dot, and
    it is then scaled by d_k * d_q. The values are dequantized 32 keys at a time into an L1 scratch from which two
    tokens at a time sum them."""
    n_head = q.shape[1]
    n_kv = n_past + t0 + m
    rbk, rbv = kh.shape[1], vh.shape[1]
    QT = np.zeros(128 * 16, np.float32)
    DQT = np.zeros(4 * 16, np.float32)
    qr = np.empty(128, np.float32)
    dq = np.zeros(4, np.float32)
    for tt in range(m):
        _q_f32(q, ((t0 + tt) * n_head + h) * 128, 128, tk, qr, dq)
        for d in range(128):
            QT[16 * d + tt] = qr[d]
        for b in range(4):
            DQT[16 * b + tt] = dq[b]
    ST = np.empty(((n_kv + 7) // 8 * 8) * 16, np.float32)
    KF = np.empty(8 * 128, np.float32)
    KD = np.zeros(8 * 4, np.float32)
    vscale = splat_f(scale)
    for j0 in range(0, n_kv, 8):
        nk = min(8, n_kv - j0)
        for k in range(8):
            _row_f32(kh, (j0 + k if k < nk else j0) * rbk, tk, 128, False, KF, 128 * k, KD, 4 * k)
        if tk == F16:
            f0, f1, f2, f3, f4, f5, f6, f7 = tile_dot8(QT, KF, 0, 128)
        else:
            f0 = f1 = f2 = f3 = f4 = f5 = f6 = f7 = splat_f(0.0)
            for b in range(4):
                a0, a1, a2, a3, a4, a5, a6, a7 = tile_dot8(QT, KF, QK * b, QK * b + QK)
                dqv = load_f(DQT, 16 * b)
                f0, f1 = fma(a0, fmul(splat_f(KD[b]), dqv), f0), fma(a1, fmul(splat_f(KD[4 + b]), dqv), f1)
                f2, f3 = fma(a2, fmul(splat_f(KD[8 + b]), dqv), f2), fma(a3, fmul(splat_f(KD[12 + b]), dqv), f3)
                f4, f5 = fma(a4, fmul(splat_f(KD[16 + b]), dqv), f4), fma(a5, fmul(splat_f(KD[20 + b]), dqv), f5)
                f6, f7 = fma(a6, fmul(splat_f(KD[24 + b]), dqv), f6), fma(a7, fmul(splat_f(KD[28 + b]), dqv), f7)
        for k, f in enumerate((f0, f1, f2, f3, f4, f5, f6, f7)):
            store_f(ST, 16 * (j0 + k), fmul(f, vscale))
    total = tile_exp(ST, n_past, t0, n_kv)
    TOT = np.empty(16, np.float32)
    store_f(TOT, 0, total)
    O = np.zeros(16 * 128, np.float32)
    VF = np.empty(VCH * 128, np.float32)
    for c0 in range(0, n_kv, VCH):
        c1 = min(n_kv, c0 + VCH)
        for j in range(c0, c1):
            _row_f32(vh, j * rbv, tv, 128, True, VF, (j - c0) * 128, KD, 0)
        for tt in range(0, m, 2):
            _pv_pair_f32(ST, tt, min(tt + 1, m - 1), c0, c1, VF, O)
    for tt in range(m):
        inv = splat_f(np.float32(1.0) / TOT[tt])
        o = out[t0 + tt, h * 128:(h + 1) * 128]
        for c in range(8):
            store_f(o, 16 * c, fmul(load_f(O, 128 * tt + 16 * c), inv))


VCH = 32    # value rows dequantized at a time by _fa_tile128 (16 KB of floats: stays in L1 beside the rest)


@numba.jit(**JIT)
def _pv_pair_f32(ST, ta, tb, c0, c1, VF, O):
    """O[ta] += sum_j ST[16 j + ta] VF[j - c0] and the same for tb, j = c0 .. c1-1 (head_dim 128): each float row
    of the scratch is read once for both tokens, 16 sums in registers."""
    a0, a1, a2, a3 = load_f(O, 128 * ta), load_f(O, 128 * ta + 16), load_f(O, 128 * ta + 32), load_f(O, 128 * ta + 48)
    a4, a5, a6, a7 = (load_f(O, 128 * ta + 64), load_f(O, 128 * ta + 80), load_f(O, 128 * ta + 96),
                      load_f(O, 128 * ta + 112))
    b0, b1, b2, b3 = load_f(O, 128 * tb), load_f(O, 128 * tb + 16), load_f(O, 128 * tb + 32), load_f(O, 128 * tb + 48)
    b4, b5, b6, b7 = (load_f(O, 128 * tb + 64), load_f(O, 128 * tb + 80), load_f(O, 128 * tb + 96),
                      load_f(O, 128 * tb + 112))
    for j in range(c0, c1):
        o = (j - c0) * 128
        v0, v1, v2, v3 = load_f(VF, o), load_f(VF, o + 16), load_f(VF, o + 32), load_f(VF, o + 48)
        v4, v5, v6, v7 = load_f(VF, o + 64), load_f(VF, o + 80), load_f(VF, o + 96), load_f(VF, o + 112)
        p = splat_f(ST[16 * j + ta])
        a0, a1, a2, a3 = fma(p, v0, a0), fma(p, v1, a1), fma(p, v2, a2), fma(p, v3, a3)
        a4, a5, a6, a7 = fma(p, v4, a4), fma(p, v5, a5), fma(p, v6, a6), fma(p, v7, a7)
        p = splat_f(ST[16 * j + tb])
        b0, b1, b2, b3 = fma(p, v0, b0), fma(p, v1, b1), fma(p, v2, b2), fma(p, v3, b3)
        b4, b5, b6, b7 = fma(p, v4, b4), fma(p, v5, b5), fma(p, v6, b6), fma(p, v7, b7)
    for c, (va, vb) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5), (a6, b6), (a7, b7))):
        store_f(O, 128 * ta + 16 * c, va)
        store_f(O, 128 * tb + 16 * c, vb)


@numba.jit(**JIT_PARALLEL)
def attention_simd(q, kc, vc, n_past, out, tk, tv):
    """attention_rows with 16-lane vectors, one work item per (query head, tile of TILE query tokens). At head_dim 128
    a tile of >= 8 tokens takes _fa_tile128; otherwise (and for decode) _fa_tile: integer dot products of Q8_0 q with
    the key rows (one vector sum per key), the exps, then the value rows summed in order (_pv_rows)."""
    n_tok, n_head, hd = q.shape
    n_gqa = n_head // kc.shape[0]
    scale = np.float32(1.0 / math.sqrt(hd))
    n_tiles = (n_tok + TILE - 1) // TILE
    for item in prange(n_head * n_tiles):
        h, t0 = item // n_tiles, (item % n_tiles) * TILE
        m = min(TILE, n_tok - t0)
        kh, vh = kc[h // n_gqa], vc[h // n_gqa]
        if hd == 128 and m >= 8:
            _fa_tile128(q, kh, vh, n_past, t0, m, h, scale, out, tk, tv)
        else:
            _fa_tile(q, kh, vh, n_past, t0, m, h, scale, out, tk, tv)


@numba.jit(**JIT)
def _fa_tile(q, kh, vh, n_past, t0, m, h, scale, out, tk, tv):
    """attention_simd's general tile (any head_dim % 32 == 0, any m <= TILE; decode is m = 1)."""
    n_head, hd = q.shape[1], q.shape[2]
    n_kv = n_past + t0 + m
    rbk, rbv = kh.shape[1], vh.shape[1]
    ng, nt = hd // 128, hd // QK - 4 * (hd // 128)
    qstride = 128 * ng + (64 if tk == Q8_0 else 128) * nt
    dstride, tstride = 32 * max(ng, 1), max(nt, 1)
    Qi = np.zeros(m * qstride, np.int8)
    DQ = np.zeros(m * dstride, np.float32)
    BI = np.zeros(m * dstride, np.int32)
    DT = np.zeros(m * tstride, np.float32)
    BT = np.zeros(m * tstride, np.int32)
    Qf = np.empty(m * hd if tk == F16 else 16, np.float32)
    dq = np.empty(hd // QK, np.float32)
    for tt in range(m):
        xo = ((t0 + tt) * n_head + h) * hd
        if tk == F16:
            _q_f32(q, xo, hd, tk, Qf[tt * hd:], dq)
        else:
            _q_prep(q, xo, hd, tk, Qi, tt * qstride, DQ, tt * dstride, BI, DT, BT, tt * tstride)
    S = np.empty(m * n_kv, np.float32)                 # row tt: the scores of token t0+tt
    # token t0+tt sees keys 0 .. n_past+t0+tt; one loop per key type (a type test inside it cost ~40 % of the pass)
    if m == 1:          # decode: Q at constant offsets, so that its loads (and dot_s8s8's |q|) leave the key loop
        if tk == Q8_0:
            for j in range(n_kv):
                S[j] = _score_q8(Qi, 0, DQ, 0, DT, 0, kh, j * rbk, hd) * scale
        elif tk == Q4_0:
            for j in range(n_kv):
                S[j] = _score_q4(Qi, 0, DQ, BI, 0, DT, BT, 0, kh, j * rbk, hd) * scale
        else:
            for j in range(n_kv):
                S[j] = _score_f16(Qf, 0, kh, j * rbk, hd) * scale
    elif tk == Q8_0:
        for j in range(n_kv):
            for tt in range(max(0, j - n_past - t0), m):
                S[tt * n_kv + j] = _score_q8(Qi, tt * qstride, DQ, tt * dstride, DT, tt * tstride, kh, j * rbk,
                                             hd) * scale
    elif tk == Q4_0:
        for j in range(n_kv):
            for tt in range(max(0, j - n_past - t0), m):
                S[tt * n_kv + j] = _score_q4(Qi, tt * qstride, DQ, BI, tt * dstride, DT, BT, tt * tstride, kh,
                                             j * rbk, hd) * scale
    else:
        for j in range(n_kv):
            for tt in range(max(0, j - n_past - t0), m):
                S[tt * n_kv + j] = _score_f16(Qf, tt * hd, kh, j * rbk, hd) * scale
    tail = np.empty(16, np.float32)
    for tt in range(m):
        n_t = n_past + t0 + tt + 1
        srow = S[tt * n_kv:tt * n_kv + n_t]
        total = exp_sum(srow, n_t, tail)
        _pv_rows(srow, n_t, vh, rbv, tv, hd, out[t0 + tt, h * hd:(h + 1) * hd], np.float32(1.0) / total)
