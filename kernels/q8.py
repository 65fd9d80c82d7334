"""Activation quantization exactly as llama.cpp's CPU matmul does it, in the layouts the fast kernels read.

llama.cpp converts the f32 activation row of every quantized matmul to the weight type's `vec_dot_type` (ggml-cpu):
* Q8_0 (for q4_0, q5_0, q8_0) and Q8_1 (for q4_1, q5_1): blocks of 32, `amax = max|x|`, `d = amax/127` stored as
  fp16, `q = round_half_even(x * (127/amax))` (the AVX2 quantizer). Q8_1 adds `s = fp16(d * sum(q))`.
* Q8_K (all k-quants): blocks of 256, the element of largest magnitude `max` (sign kept), `iscale = -127/max`,
  `q = min(127, nearest_int(iscale*x))`, `d = 1/iscale` as f32, `bsums` = sums of each 16 quants (the scalar
  reference, which x86 builds use).
* F16: the row rounded to fp16 (round half to even; numpy's astype does it, see fast.py).

Layouts (one token; the kernels step through the weights in *groups* of 4 legacy blocks = 128 weights, or in 256-weight
super-blocks, and load activations 64 bytes at a time so that byte lane k meets the weight byte lane k):
* legacy "nibble" order (all legacy types; q8_0 weights are repacked to match): per group
  `xq[16b+j] = q[32b+j]`, `xq[64+16b+j] = q[32b+16+j]` (b = block 0..3, j = 0..15): the low nibbles of 4 packed
  blocks meet the first 64 bytes, the high nibbles the second; `xd[4g + b] = d_b`, `xsum[4g + b] = -sum(q_b)`,
  `xs[4g + b] = s_b / 4` (the Q8_1 sum). The kernels broadcast each to i32 lanes 4b..4b+3, the lanes of block b (one
  vpermd), so a block's sum or s enters 4 times: hence s / 4 (exact) and the bias as a shift of -sum by 2 less. The
  alternatives, each value in lane 4b only (a vpexpandd and a vpmulld per group and row) and 64-byte pre-expanded
  vectors (a 22016-wide activation row then no longer fits L1), measured slower (bench/results/2026-11-27.md).
* legacy "wide" order (q4_0 repacked in groups of 16 blocks, specs.Q4_0W): per group g and k = 0..3,
  `xq[512g + 128k + 4j + b] = q[32(16g + j) + 4k + b]` ("lo", meeting the low nibbles) and
  `xq[512g + 128k + 64 + 4j + b] = q[32(16g + j) + 16 + 4k + b]` ("hi"), so that i32 lane j is block j;
  `xd[16g + j] = d`, `xsum[16g + j] = bmul * sum(q)` (q4_0: -8, the quants' offset, in the lane of its block: no
  broadcast, no shift).
* Q8_K: `xq[256k + i] = q[256k + perm[i]]` with a permutation (PERM_SUB, the order of the repacked q2_K, q3_K,
  q4_K, q5_K and q6_K, which the kernels read; PERM_NATURAL, the identity), `xd[k] = d`, and the 16 sums of 16 quants per super-block in `xb` (times -4
  for the PERM_SUB layout); for PERM_SUB also `xf`: the same sums (without the -4) times -d as float, which the min
  terms of q2_K, q4_K and q5_K take in float.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from . import CACHE
from .simd import (fabs_v, fmul, hmax_f, hmin_f, hsum_i, load_f, rint_i, round_h1, round_h16, splat_f, splat_i,
                   store_b4, store_b16, store_f, store_h16, vadd, vmax_f, vmin_f, vmin_i)

JITQ = dict(nopython=True, nogil=True, cache=CACHE, fastmath=False, boundscheck=False)

QK = 32
GROUP = 128
WIDE = 512          # activation bytes of a wide group: 16 blocks
QK_K = 256


@numba.jit(**JITQ)
def fp16_round(v):
    """The float32 value of fp16(v) for finite v >= 0 (round half to even, subnormals included, inf past 65504)."""
    if v == 0.0:
        return np.float32(0.0)
    if v < 6.103515625e-05:                       # fp16 subnormal range: multiples of 2^-24
        return np.float32(np.rint(np.float64(v) * 16777216.0) / 16777216.0)
    m, e = math.frexp(np.float64(v))              # v = m * 2^e, m in [0.5, 1): keep 11 significant bits
    r = math.ldexp(np.rint(m * 2048.0) / 2048.0, e)
    return np.float32(np.inf) if r > 65504.0 else np.float32(r)     # past fp16's largest finite: inf, as F16C


@numba.jit(**JITQ)
def _q8_0_block(x, o, q):
    """Quantize x[o:o+32] into q[0:32] (int32 scratch); returns (fp16-rounded d, unrounded d, sum of q)."""
    amax = np.float32(0.0)
    for j in range(QK):
        a = abs(x[o + j])
        if a > amax:
            amax = a
    d = amax / np.float32(127.0)
    inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
    s = 0
    for j in range(QK):
        v = int(np.rint(x[o + j] * inv))
        q[j] = v
        s += v
    return fp16_round(d), d, s


@numba.jit(**JITQ)
def quantize_q8_0_nibble_ref(x, xq, xd, xsum, xs):
    """One row, legacy nibble order (see module doc), element by element: the readable definition that
    `quantize_q8_0_nibble` is tested against. x: f32[n]; the outputs cover ceil(n/128) groups (padded 0)."""
    n = x.shape[0]
    nblk = (n + QK - 1) // QK
    ngrp = (nblk + 3) // 4
    q = np.empty(QK, np.int32)
    xd[:ngrp * 4] = 0.0
    xsum[:ngrp * 4] = 0
    xs[:ngrp * 4] = 0.0
    xq[:ngrp * GROUP] = 0
    for b in range(nblk):
        if (b + 1) * QK > n:
            raise ValueError("row length must be a multiple of 32")
        dr, d, s = _q8_0_block(x, b * QK, q)
        g, bb = b // 4, b % 4
        base = g * GROUP + 16 * bb
        for j in range(16):
            xq[base + j] = q[j]
            xq[base + 64 + j] = q[16 + j]
        xd[b] = dr
        xsum[b] = -s
        xs[b] = fp16_round(abs(d * np.float32(s))) * (0.25 if s >= 0 else -0.25)


@numba.jit(**JITQ)
def quantize_q8_K_ref(x, perm, bmul, xq, xd, xb, xf):
    """One row to Q8_K, element by element (the readable definition that `quantize_q8_K` is tested against): xq
    permuted by `perm` (256 entries), xd[k] = d, xb[16k..] the 16 sums of 16 quants times `bmul`; if xf is not
    empty, the same sums (without `bmul`) times -d as float, for the min terms of q2_K / q4_K / q5_K."""
    n = x.shape[0]
    if n % QK_K:
        raise ValueError("row length must be a multiple of 256")
    q = np.empty(QK_K, np.int32)
    for k in range(n // QK_K):
        o = k * QK_K
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        for j in range(QK_K):
            a = abs(x[o + j])
            if a > amax:
                amax = a
                mx = x[o + j]
        if amax == 0.0:
            xd[k] = 0.0
            for j in range(QK_K):
                q[j] = 0
        else:
            iscale = np.float32(-127.0) / mx
            for j in range(QK_K):
                v = int(np.rint(iscale * x[o + j]))
                q[j] = min(127, v)
            xd[k] = np.float32(1.0) / iscale
        for j in range(QK_K):
            xq[o + j] = q[perm[j]]
        for i in range(16):
            s = 0
            for j in range(16):
                s += q[16 * i + j]
            xb[16 * k + i] = s * bmul
        if xf.shape[0]:
            for i in range(16):
                xf[16 * k + i] = -xd[k] * np.float32(xb[16 * k + i] // bmul)


# ------------------------------------------------------------------------------------------- 16 lanes at a time
# The same quantizers on 16-float vectors (kernels/simd.py), bit for bit (tests/kernels/test_q8.py): the element loops
# above were a few per cent of a prompt batch's mat-mat, and one such call runs per weight input of every decode
# token (bench/results/2026-11-27.md).
LAYOUT_NATURAL, LAYOUT_SUB = 0, 1     # Q8_K byte orders: PERM_NATURAL, PERM_SUB


@numba.jit(**JITQ)
def _q8_0_vec(x, o):
    """The Q8_0 block x[o:o+32] on vectors: (quants 0..15, quants 16..31, unrounded d, sum of the quants)."""
    v0 = load_f(x, o)
    v1 = load_f(x, o + 16)
    amax = hmax_f(vmax_f(fabs_v(v0), fabs_v(v1)))
    d = amax / np.float32(127.0)
    inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
    vi = splat_f(inv)
    q0 = rint_i(fmul(v0, vi))
    q1 = rint_i(fmul(v1, vi))
    return q0, q1, d, hsum_i(vadd(q0, q1))


@numba.jit(**JITQ)
def quantize_q8_0_nibble(x, xq, xd, xsum, xs):
    """One row, legacy nibble order (see module doc). x: f32[n]; the outputs cover ceil(n/128) groups (padded 0)."""
    n = x.shape[0]
    if n % QK:
        raise ValueError("row length must be a multiple of 32")
    nblk = n // QK
    for b in range(nblk):
        q0, q1, d, s = _q8_0_vec(x, b * QK)
        base = (b // 4) * GROUP + 16 * (b % 4)
        store_b16(xq, base, q0)
        store_b16(xq, base + 64, q1)
        xd[b] = round_h1(d)
        xsum[b] = -s
        xs[b] = round_h1(abs(d * np.float32(s))) * (0.25 if s >= 0 else -0.25)
    zero = splat_i(0)
    for b in range(nblk, (nblk + 3) // 4 * 4):     # the rest of a partial last group
        base = (b // 4) * GROUP + 16 * (b % 4)
        store_b16(xq, base, zero)
        store_b16(xq, base + 64, zero)
        xd[b] = 0.0
        xsum[b] = 0
        xs[b] = 0.0


@numba.jit(**JITQ)
def quantize_q8_0_wide(x, bmul, xq, xd, xsum):
    """One row in the wide legacy order (see module doc): groups of 16 blocks, block j's quants in i32 lane j.
    x: f32[n]; the outputs cover ceil(n/512) groups (padded 0)."""
    n = x.shape[0]
    if n % QK:
        raise ValueError("row length must be a multiple of 32")
    nblk = n // QK
    for b in range(nblk):
        q0, q1, d, s = _q8_0_vec(x, b * QK)
        base = (b // 16) * WIDE + 4 * (b % 16)
        for k in range(4):
            store_b4(xq, base + 128 * k, q0, k)
            store_b4(xq, base + 128 * k + 64, q1, k)
        xd[b] = round_h1(d)
        xsum[b] = bmul * s
    for b in range(nblk, (nblk + 15) // 16 * 16):   # the rest of a partial last group
        base = (b // 16) * WIDE + 4 * (b % 16)
        for k in range(8):
            xq[base + 64 * k:base + 64 * k + 4] = 0
        xd[b] = 0.0
        xsum[b] = 0


@numba.jit(**JITQ)
def _signed_max(x, o):
    """The element of x[o:o+256] of largest magnitude, sign kept, the first one on a tie (as the reference)."""
    hi = load_f(x, o)
    lo = hi
    for j in range(1, 16):
        v = load_f(x, o + 16 * j)
        hi = vmax_f(hi, v)
        lo = vmin_f(lo, v)
    h = hmax_f(hi)
    m = -hmin_f(lo)
    if h > m:
        return h
    if m > h:
        return -m
    if h == 0.0:
        return np.float32(0.0)
    for j in range(QK_K):          # +a and -a both present: the first of them decides
        if abs(x[o + j]) == h:
            return x[o + j]
    return h


@numba.jit(**JITQ)
def quantize_q8_K(x, layout, bmul, xq, xd, xb, xf):
    """One row to Q8_K in byte order `layout` (LAYOUT_*: the PERM_* of quantize_q8_K_ref), xd, xb and xf as there."""
    n = x.shape[0]
    if n % QK_K:
        raise ValueError("row length must be a multiple of 256")
    c127 = splat_i(127)
    for k in range(n // QK_K):
        o = k * QK_K
        mx = _signed_max(x, o)
        iscale = np.float32(-127.0) / mx if mx != 0.0 else np.float32(0.0)
        xd[k] = np.float32(1.0) / iscale if mx != 0.0 else np.float32(0.0)
        vs = splat_f(iscale)
        for j in range(16):
            q = vmin_i(rint_i(fmul(vs, load_f(x, o + 16 * j))), c127)
            if layout == LAYOUT_SUB:        # 4-element group p of sub-block j -> part p, i32 lane j
                for p in range(4):
                    store_b4(xq, o + 64 * p + 4 * j, q, p)
            else:
                store_b16(xq, o + 16 * j, q)
            xb[16 * k + j] = hsum_i(q) * bmul
        if xf.shape[0]:
            for i in range(16):
                xf[16 * k + i] = -xd[k] * np.float32(xb[16 * k + i] // bmul)


# ------------------------------------------------------------------------------------------- batched (prompt) forms
@numba.jit(**dict(JITQ, parallel=True))
def quantize_q8_0_nibble_rows(X, xq, xd, xsum, xs):
    for t in prange(X.shape[0]):
        quantize_q8_0_nibble(X[t], xq[t], xd[t], xsum[t], xs[t])


@numba.jit(**dict(JITQ, parallel=True))
def quantize_q8_0_wide_rows(X, bmul, xq, xd, xsum):
    for t in prange(X.shape[0]):
        quantize_q8_0_wide(X[t], bmul, xq[t], xd[t], xsum[t])


@numba.jit(**dict(JITQ, parallel=True))
def quantize_q8_K_rows(X, layout, bmul, xq, xd, xb, xf):
    for t in prange(X.shape[0]):
        quantize_q8_K(X[t], layout, bmul, xq[t], xd[t], xb[t], xf[t])


@numba.jit(**dict(JITQ, parallel=True))
def f16_round_rows(X, out):
    """out[:n] (f32[n_pad * c], flat) = the rows of X (f32[n * c], flat; c % 16 == 0) rounded to fp16 precision:
    the F16 mat-mat's activations (numpy's astype pair took a sixth of the f16 prompt's time)."""
    n = X.shape[0]
    n_blk = n // 16
    per = max(1, n_blk // 64)
    for c in prange((n_blk + per - 1) // per):
        for b in range(c * per, min(c * per + per, n_blk)):
            store_f(out, 16 * b, round_h16(load_f(X, 16 * b)))


@numba.jit(**JITQ)
def f16_bytes(x, out):
    """out (int8[2 n]) = the fp16 bytes of x (f32[n], n % 16 == 0): the F16 mat-vec's activation row."""
    for b in range(x.shape[0] // 16):
        store_h16(out, 32 * b, load_f(x, 16 * b))


# ------------------------------------------------------------------------------------------- Q8_K permutations
def _perm_natural() -> np.ndarray:
    return np.arange(QK_K, dtype=np.int32)


def _perm_sub() -> np.ndarray:
    """q2_K/q3_K/q4_K/q5_K as repacked at load (fast.repack_k2, repack_k4): byte 4k + b of part p (the 2-bit field
    at shift 2p, the nibble, ... of the 64 packed bytes) is element 16k + 4p + b, so that i32 lane k of every part
    belongs to the 16-element sub-block k (and to the 32-element one k // 2)."""
    return np.array([16 * k + 4 * p + b for p in range(4) for k in range(16) for b in range(4)], dtype=np.int32)


PERM_NATURAL = _perm_natural()
PERM_SUB = _perm_sub()
