"""The non-matmul operations of the LLaMA forward pass, as llama.cpp computes them (`llama_build_graph` in
`llama.cpp`, the ops in `ggml.c`, at commit dadbed9).

RMSNorm, RoPE ("normal" mode 0: adjacent pairs, with frequency base and scale), causal grouped-query attention over
an fp16 KV cache, softmax, SwiGLU. Activations are float32 C-contiguous arrays; the KV cache holds fp16 bit
patterns as uint16 (2 bytes per value, like llama.cpp's default F16 cache), head-major, converted to float32 in
registers (`f16_to_f32`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import JIT, JIT_PARALLEL, simd
from .simd import (exp_f, fadd, fdiv, fma, fmax, fmul, fsub, hmax_f, hsum_f, load_f, load_h16, round_h16,
                                      splat_f, store_f, store_h16)


# Decode (one token) runs every small op on the calling thread: between two weight streams the caches and the worker
# threads are cold, and a parallel region costs more than the op's own work (bench/results/2026-11-27.md, "Small ops");
# a batch splits its tokens over the threads. Each op below is one Numba call for both, `_rows` being the batch form.
@njit(**JIT)
def _rmsnorm_row(xt, weight, eps, ot):
    n = xt.shape[0]
    ss = 0.0
    for i in range(n):
        ss += np.float64(xt[i]) * np.float64(xt[i])
    scale = np.float32(1.0 / math.sqrt(ss / n + eps))
    for i in range(n):
        ot[i] = xt[i] * scale * weight[i]


@njit(**JIT_PARALLEL)
def _rmsnorm_rows(x, weight, eps, out):
    for t in prange(x.shape[0]):
        _rmsnorm_row(x[t], weight, eps, out[t])


@njit(**JIT)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x, out float32 [n_tok, n]; sum of squares in float64."""
    if x.shape[0] == 1:
        _rmsnorm_row(x[0], weight, eps, out[0])
    else:
        _rmsnorm_rows(x, weight, eps, out)


@njit(**JIT)
def _add_row(xt, yt):
    for i in range(xt.shape[0]):
        xt[i] += yt[i]


@njit(**JIT_PARALLEL)
def _add_rmsnorm_rows(x, y, weight, eps, out):
    for t in prange(x.shape[0]):
        _add_row(x[t], y[t])
        _rmsnorm_row(x[t], weight, eps, out[t])


@njit(**JIT)
def add_rmsnorm(x, y, weight, eps, out):
    """x += y, then out = rmsnorm(x) * weight (a residual connection and the norm after it, in one call)."""
    if x.shape[0] == 1:
        _add_row(x[0], y[0])
        _rmsnorm_row(x[0], weight, eps, out[0])
    else:
        _add_rmsnorm_rows(x, y, weight, eps, out)


@njit(**dict(JIT, fastmath=False))
def rope(x, pos, n_rot, freq_base, freq_scale, freq_factors=None):
    """In-place RoPE, llama.cpp mode 0, on x float32 [n_tok, n_heads, head_dim] at integer positions pos [n_tok].

    Pair (x[2i], x[2i+1]) of the first n_rot dims is rotated by theta_i = freq_scale * p * freq_base^(-2i/n_rot),
    divided by freq_factors[i] when given (a GGUF's rope_freqs tensor: LLaMA-3.1's long-context frequencies).
    Without fastmath: with it, LLVM fused the rotation's products into FMAs in some callers and not in others
    (rope_kv's inlined copy differed from a direct call in the last bit), so the keys depended on the call site.
    """
    n_tok, n_heads = x.shape[0], x.shape[1]
    half = n_rot // 2
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for t in range(n_tok):
        p = freq_scale * np.float64(pos[t])
        for i in range(half):
            theta = p * freq_base ** (-2.0 * i / n_rot)
            if freq_factors is not None:
                theta /= freq_factors[i]
            cos[i] = math.cos(theta)
            sin[i] = math.sin(theta)
        for h in range(n_heads):
            v = x[t, h]
            for i in range(half):
                x0, x1 = v[2 * i], v[2 * i + 1]
                v[2 * i] = x0 * cos[i] - x1 * sin[i]
                v[2 * i + 1] = x0 * sin[i] + x1 * cos[i]


@njit(**JIT)
def round_f16(a):
    """Round float32 values in place to the nearest fp16 value (ties to even), as ggml does before F16 dot products.

    Normal fp16 range: keep 10 mantissa bits; below 2^-14 (fp16 subnormals): round to a multiple of 2^-24;
    from 65520 on: infinity. NaN stays NaN.
    """
    u = a.view(np.uint32)
    for i in range(a.shape[0]):
        bits = np.int64(u[i])
        mag = bits & 0x7FFFFFFF
        if mag > 0x7F800000:
            continue
        if mag >= 0x477FF000:
            u[i] = np.uint32((bits & 0x80000000) | 0x7F800000)
        elif mag >= 0x38800000:
            bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
            u[i] = np.uint32(bits)
        else:
            a[i] = np.float32(np.rint(np.float64(a[i]) * 16777216.0) / 16777216.0)


@njit(**JIT)
def softmax(s):
    """In place: s = exp(s - max) / sum, sum in float64 (ggml_vec_soft_max)."""
    m = -np.inf
    for j in range(s.shape[0]):
        m = max(m, s[j])
    total = 0.0
    for j in range(s.shape[0]):
        e = np.float32(math.exp(s[j] - m))
        s[j] = e
        total += e
    inv = np.float32(1.0 / total)
    for j in range(s.shape[0]):
        s[j] *= inv


@njit(**JIT)
def f16_to_f32(h):
    """The fp16 bit pattern h as float32, in arithmetic that vectorizes (no table gather).

    Sign, exponent and mantissa moved into float32 position, times 2^112 (the exponent bias difference): exact for
    normal and subnormal halves. (fp16 inf/NaN, which a KV cache never holds, would come out finite.)
    """
    h = np.int32(h)
    bits = np.uint32(((h & 0x7FFF) << 13) | ((h & 0x8000) << 16))
    return bits.view(np.float32) * np.float32(5.192296858534828e33)


ATT_TILE = 16   # query tokens that share one pass over the keys and values in attention_tiled


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int, out: np.ndarray) -> None:
    """Causal grouped-query attention (see attention_rows for the arguments and llama.cpp's rounding). A batch takes
    attention_tiled, which reads each key and value once per tile of ATT_TILE query tokens instead of once per
    token: for a prompt batch late in a long context that is most of the time spent outside the weights."""
    if simd.ISA != "none" and q.shape[2] % 16 == 0:
        attention_simd(q, k_cache, v_cache, n_past, out)
    elif q.shape[0] >= 4:
        attention_tiled(q, k_cache, v_cache, n_past, out)
    else:
        attention_rows(q, k_cache, v_cache, n_past, out)


@njit(**JIT)
def exp_sum(s, n, tail):
    """s[:n] = exp(s[:n] - max(s[:n])) (simd.exp_f, 16 lanes at a time); returns their float32 sum. `tail`: 16 floats
    of scratch for the last partial vector."""
    n16 = n - n % 16
    mx = s[0]
    for j in range(n16, n):
        mx = max(mx, s[j])
    vm = splat_f(mx)
    for j in range(0, n16, 16):
        vm = fmax(vm, load_f(s, j))
    vm = splat_f(hmax_f(vm))
    acc = splat_f(0.0)
    for j in range(0, n16, 16):
        e = exp_f(fsub(load_f(s, j), vm))
        store_f(s, j, e)
        acc = fadd(acc, e)
    total = hsum_f(acc)
    if n16 < n:
        for j in range(16):
            tail[j] = s[n16 + j] if n16 + j < n else np.float32(-1e30)   # finite: fastmath assumes no inf
        store_f(tail, 0, exp_f(fsub(load_f(tail, 0), vm)))
        for j in range(n - n16):
            s[n16 + j] = tail[j]
            total += tail[j]
    return total


@njit(**JIT)
def softmax_f16_simd(s, tail):
    """softmax(s) rounded to fp16, in place, 16 lanes at a time (exp by simd.exp_f, the sum in float32 lanes).
    `tail`: 16 floats of scratch for the last partial vector."""
    n = s.shape[0]
    n16 = n - n % 16
    inv = splat_f(np.float32(1.0) / exp_sum(s, n, tail))
    for j in range(0, n16, 16):
        store_f(s, j, round_h16(fmul(load_f(s, j), inv)))
    for j in range(n16, n):
        tail[j - n16] = s[j]
    if n16 < n:
        store_f(tail, 0, round_h16(fmul(load_f(tail, 0), inv)))
        for j in range(n - n16):
            s[n16 + j] = tail[j]


@njit(**JIT)
def _pv_pair128(pa, pb, st, vh, n_a, oa, ob):
    """oa = sum_j<n_a pa[j*st] v_j, ob = sum_j<=n_a pb[j*st] v_j (head_dim 128): each value row is widened once for
    both tokens, 16 accumulators in registers."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat_f(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = splat_f(0.0)
    for j in range(n_a):
        o = j * 128
        v0, v1, v2, v3 = load_h16(vh, o), load_h16(vh, o + 16), load_h16(vh, o + 32), load_h16(vh, o + 48)
        v4, v5, v6, v7 = load_h16(vh, o + 64), load_h16(vh, o + 80), load_h16(vh, o + 96), load_h16(vh, o + 112)
        p = splat_f(pa[j * st])
        a0, a1, a2, a3 = fma(p, v0, a0), fma(p, v1, a1), fma(p, v2, a2), fma(p, v3, a3)
        a4, a5, a6, a7 = fma(p, v4, a4), fma(p, v5, a5), fma(p, v6, a6), fma(p, v7, a7)
        p = splat_f(pb[j * st])
        b0, b1, b2, b3 = fma(p, v0, b0), fma(p, v1, b1), fma(p, v2, b2), fma(p, v3, b3)
        b4, b5, b6, b7 = fma(p, v4, b4), fma(p, v5, b5), fma(p, v6, b6), fma(p, v7, b7)
    o = n_a * 128                                     # the second token also sees key n_a
    p = splat_f(pb[n_a * st])
    b0, b1, b2, b3 = (fma(p, load_h16(vh, o), b0), fma(p, load_h16(vh, o + 16), b1), fma(p, load_h16(vh, o + 32), b2),
                      fma(p, load_h16(vh, o + 48), b3))
    b4, b5, b6, b7 = (fma(p, load_h16(vh, o + 64), b4), fma(p, load_h16(vh, o + 80), b5),
                      fma(p, load_h16(vh, o + 96), b6), fma(p, load_h16(vh, o + 112), b7))
    for c, (va, vb) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5), (a6, b6), (a7, b7))):
        store_f(oa, 16 * c, va)
        store_f(ob, 16 * c, vb)


@njit(**JIT, inline="always")
def tile_dot8(QT, KF, d0, d1):
    """The transposed tile's scores of 8 keys over dimensions d0..d1-1: lane tt of the k-th vector = sum over d of
    QT[d][tt] * KF[128 k + d] (QT: the tile's queries as [d][16 lanes], KF: 8 keys of 128 floats). 8 independent
    FMA chains; each key element is broadcast from memory."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = splat_f(0.0)
    for d in range(d0, d1):
        qd = load_f(QT, 16 * d)
        a0, a1 = fma(splat_f(KF[d]), qd, a0), fma(splat_f(KF[128 + d]), qd, a1)
        a2, a3 = fma(splat_f(KF[256 + d]), qd, a2), fma(splat_f(KF[384 + d]), qd, a3)
        a4, a5 = fma(splat_f(KF[512 + d]), qd, a4), fma(splat_f(KF[640 + d]), qd, a5)
        a6, a7 = fma(splat_f(KF[768 + d]), qd, a6), fma(splat_f(KF[896 + d]), qd, a7)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(**JIT, inline="always")
def tile_mask_max(ST, n_past, t0, n_kv):
    """Causal mask on transposed scores ST (lane tt of ST[j]: token t0+tt, key j): key j is in the future of token
    t0+tt when tt < j - n_past - t0 (only the last keys), set to -1e30; returns the lane-wise maximum over the keys."""
    for j in range(n_past + t0 + 1, n_kv):
        for tt in range(j - n_past - t0):
            ST[16 * j + tt] = np.float32(-1e30)
    vm = splat_f(-1e30)
    for j in range(n_kv):
        vm = fmax(vm, load_f(ST, 16 * j))
    return vm


@njit(**JIT, inline="always")
def tile_exp(ST, n_past, t0, n_kv):
    """The transposed scores ST (see tile_mask_max) -> exp(s - the lane's maximum), the causally masked ones 0;
    returns the lane-wise sums."""
    vm = tile_mask_max(ST, n_past, t0, n_kv)
    total = splat_f(0.0)
    for j in range(n_kv):
        e = exp_f(fsub(load_f(ST, 16 * j), vm))
        store_f(ST, 16 * j, e)
        if j > n_past + t0:                            # exp_f's floor is exp(-87), not 0: zero the masked keys
            for tt in range(j - n_past - t0):
                ST[16 * j + tt] = np.float32(0.0)
            e = load_f(ST, 16 * j)
        total = fadd(total, e)
    return total


@njit(**JIT)
def _attention_tile128(q, kh, vh, n_past, t0, m, h, scale, out):
    """One query head, tokens t0 .. t0+m-1 (m <= 16), head_dim 128, scores kept transposed: lane tt of ST[j] is the
    score of token t0+tt for key j. Q is stored transposed (QT[d] = lane tt: q[t0+tt, h, d]), so the 16 scores of
    a key are 128 vector FMAs of QT[d] with the key's broadcast elements -- no horizontal sums -- and 8 keys at a
    time keep 8 independent FMA chains. The softmax then runs lane-wise down the columns."""
    n_kv = n_past + t0 + m
    QT = np.zeros(128 * 16, np.float32)
    for tt in range(m):
        qt = q[t0 + tt, h]
        for c in range(8):
            store_f(QT, 16 * (8 * tt + c), round_h16(load_f(qt, 16 * c)))   # row-major [tt][d] for now ...
    QR = QT.copy()
    for tt in range(16):                                                    # ... then transposed to [d][tt]
        for d in range(128):
            QT[16 * d + tt] = QR[128 * tt + d] if tt < m else np.float32(0.0)
    ST = np.empty(((n_kv + 7) // 8 * 8) * 16, np.float32)
    KF = np.empty(8 * 128, np.float32)
    vscale = splat_f(scale)
    for j0 in range(0, n_kv, 8):
        nk = min(8, n_kv - j0)
        for k in range(8):
            jk = j0 + k if k < nk else j0                   # a short last block recomputes key j0 into ST padding
            for c in range(8):
                store_f(KF, 128 * k + 16 * c, load_h16(kh, jk * 128 + 16 * c))
        for k, a in enumerate(tile_dot8(QT, KF, 0, 128)):
            store_f(ST, 16 * (j0 + k), fmul(a, vscale))
    total = tile_exp(ST, n_past, t0, n_kv)
    inv = fdiv(splat_f(1.0), total)
    for j in range(n_kv):
        store_f(ST, 16 * j, round_h16(fmul(load_f(ST, 16 * j), inv)))
    for tt in range(0, m, 2):
        t1 = min(tt + 1, m - 1)                         # odd m: the last token pairs with itself
        _pv_pair128(ST[tt:], ST[t1:], 16, vh, n_past + t0 + t1, out[t0 + tt, h * 128:(h + 1) * 128],
                    out[t0 + t1, h * 128:(h + 1) * 128])


@njit(**JIT)
def _tile_plan(q, k_cache):
    """(n_gqa, 1 / sqrt(head_dim), tiles per head) of the tiled attention kernels, whose work items are one tile of
    ATT_TILE query tokens of one query head each."""
    n_tok, n_head, head_dim = q.shape
    return n_head // k_cache.shape[0], np.float32(1.0 / math.sqrt(head_dim)), (n_tok + ATT_TILE - 1) // ATT_TILE


@njit(**JIT)
def _tile_of(item, n_tiles, n_tok):
    """(query head, first token, tokens) of work item `item` of a tiled attention kernel."""
    t0 = (item % n_tiles) * ATT_TILE
    return item // n_tiles, t0, min(ATT_TILE, n_tok - t0)


@njit(**JIT_PARALLEL)
def attention_simd(q, k_cache, v_cache, n_past, out):
    """attention_tiled with 16-lane vectors (head_dim % 16 == 0; needs F16C), one work item per (query head, tile of
    ATT_TILE tokens). Keys and values are widened by `vcvtph2ps` as they are read; the softmax is
    softmax_f16_simd. At head_dim 128 a tile of >= 8 tokens takes _attention_tile128 (transposed scores, no
    horizontal sums) and the value sums run two tokens per pass over the value rows (_pv_pair128); otherwise a
    score is one vector FMA chain + horizontal sum (_attention_tile), which is also the decode path."""
    n_tok, n_head, head_dim = q.shape
    n_gqa, scale, n_tiles = _tile_plan(q, k_cache)
    for item in prange(n_head * n_tiles):
        h, t0, m = _tile_of(item, n_tiles, n_tok)
        kh, vh = k_cache[h // n_gqa], v_cache[h // n_gqa]
        if head_dim == 128 and m >= 8:
            _attention_tile128(q, kh, vh, n_past, t0, m, h, scale, out)
        else:
            _attention_tile(q, kh, vh, n_past, t0, m, h, scale, out)


@njit(**JIT)
def _attention_tile(q, kh, vh, n_past, t0, m, h, scale, out):
    """attention_simd for one query head and tokens t0 .. t0+m-1, any head_dim % 16 == 0 (and decode)."""
    head_dim = q.shape[2]
    nc = head_dim // 16
    n_kv = n_past + t0 + m
    Q = np.empty(m * head_dim, np.float32)         # scratch per tile (not per key)
    for tt in range(m):
        qt = q[t0 + tt, h]
        for c in range(nc):
            store_f(Q, tt * head_dim + 16 * c, round_h16(load_f(qt, 16 * c)))
    S = np.empty(m * n_kv, np.float32)             # row tt: the scores of token t0+tt
    tail = np.empty(16, np.float32)
    for j in range(n_kv):
        for tt in range(max(0, j - n_past - t0), m):     # token t0+tt sees keys 0 .. n_past+t0+tt
            acc = splat_f(0.0)
            for c in range(nc):
                acc = fma(load_f(Q, tt * head_dim + 16 * c), load_h16(kh, j * head_dim + 16 * c), acc)
            S[tt * n_kv + j] = hsum_f(acc) * scale
    for tt in range(m):
        softmax_f16_simd(S[tt * n_kv:tt * n_kv + n_past + t0 + tt + 1], tail)
    if head_dim == 128:         # LLaMA's head size: value rows read in order (two tokens share each when m > 1)
        for tt in range(0, m, 2):
            t1 = min(tt + 1, m - 1)                 # odd m: the last token pairs with itself
            _pv_pair128(S[tt * n_kv:], S[t1 * n_kv:], 1, vh, n_past + t0 + t1,
                        out[t0 + tt, h * 128:(h + 1) * 128], out[t0 + t1, h * 128:(h + 1) * 128])
        return
    for tt in range(m):
        n_t = n_past + t0 + tt + 1
        srow = S[tt * n_kv:tt * n_kv + n_t]
        orow = out[t0 + tt, h * head_dim:(h + 1) * head_dim]
        for c in range(nc):
            a0 = splat_f(0.0)
            a1 = splat_f(0.0)
            a2 = splat_f(0.0)
            a3 = splat_f(0.0)
            j = 0
            while j + 4 <= n_t:
                a0 = fma(splat_f(srow[j]), load_h16(vh, j * head_dim + 16 * c), a0)
                a1 = fma(splat_f(srow[j + 1]), load_h16(vh, (j + 1) * head_dim + 16 * c), a1)
                a2 = fma(splat_f(srow[j + 2]), load_h16(vh, (j + 2) * head_dim + 16 * c), a2)
                a3 = fma(splat_f(srow[j + 3]), load_h16(vh, (j + 3) * head_dim + 16 * c), a3)
                j += 4
            while j < n_t:
                a0 = fma(splat_f(srow[j]), load_h16(vh, j * head_dim + 16 * c), a0)
                j += 1
            store_f(orow, 16 * c, fadd(fadd(a0, a1), fadd(a2, a3)))


@njit(**JIT_PARALLEL)
def attention_tiled(q, k_cache, v_cache, n_past, out):
    """attention_rows, computed per (query head, tile of ATT_TILE tokens): each key/value row is converted from fp16
    once per tile and meets every token of the tile that may see it."""
    n_tok, n_head, head_dim = q.shape
    n_gqa, scale, n_tiles = _tile_plan(q, k_cache)
    for item in prange(n_head * n_tiles):
        h, t0, m = _tile_of(item, n_tiles, n_tok)
        n_kv = n_past + t0 + m                         # keys seen by the tile's last token
        kh, vh = k_cache[h // n_gqa], v_cache[h // n_gqa]
        Q = np.empty((m, head_dim), np.float32)        # scratch per tile (not per key)
        for tt in range(m):
            Q[tt] = q[t0 + tt, h]
            round_f16(Q[tt])
        S = np.empty((m, n_kv), np.float32)
        row = np.empty(head_dim, np.float32)
        for j in range(n_kv):
            kj = kh[j]
            for d in range(head_dim):
                row[d] = f16_to_f32(kj[d])
            for tt in range(max(0, j - n_past - t0), m):     # token t0+tt sees keys 0 .. n_past+t0+tt
                acc = np.float32(0.0)
                for d in range(head_dim):
                    acc += Q[tt, d] * row[d]
                S[tt, j] = acc * scale
        for tt in range(m):
            s = S[tt, :n_past + t0 + tt + 1]
            softmax(s)
            round_f16(s)
        O = np.zeros((m, head_dim), np.float32)
        for j in range(n_kv):
            vj = vh[j]
            for d in range(head_dim):
                row[d] = f16_to_f32(vj[d])
            for tt in range(max(0, j - n_past - t0), m):
                p = S[tt, j]
                for d in range(head_dim):
                    O[tt, d] += p * row[d]
        for tt in range(m):
            out[t0 + tt, h * head_dim:(h + 1) * head_dim] = O[tt]


@njit(**JIT_PARALLEL)
def attention_rows(q, k_cache, v_cache, n_past, out):
    """Causal grouped-query attention for n_tok new tokens at positions n_past .. n_past+n_tok-1, one (token, head)
    per work item (decode).

    q: float32 [n_tok, n_head, head_dim] (already roped); k_cache, v_cache: uint16 (fp16 bits) [n_head_kv, n_ctx,
    head_dim] holding positions 0 .. n_past+n_tok-1 (head-major, so one head's keys stream contiguously);
    out: float32 [n_tok, n_head * head_dim].
    Query head h reads kv head h // (n_head / n_head_kv). As llama.cpp with an F16 cache: q and the softmax row are
    rounded to fp16 before their dot products; scores are scaled by 1/sqrt(head_dim) after the dot product.
    """
    n_tok, n_head, head_dim = q.shape
    n_gqa = n_head // k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        n_kv = n_past + t + 1                          # causal: position n_past+t sees 0 .. n_past+t
        kh, vh = k_cache[h // n_gqa], v_cache[h // n_gqa]   # [n_ctx, head_dim] of this query head's kv head
        qh = q[t, h].copy()
        round_f16(qh)
        s = np.empty(n_kv, np.float32)
        for j in range(n_kv):
            kj = kh[j]
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += qh[d] * f16_to_f32(kj[d])
            s[j] = acc * scale
        softmax(s)
        round_f16(s)
        o = out[t, h * head_dim:(h + 1) * head_dim]
        o[:] = 0.0
        for j in range(n_kv):
            vj = vh[j]
            p = s[j]
            for d in range(head_dim):
                o[d] += p * f16_to_f32(vj[d])


def silu_mul(gate: np.ndarray, up: np.ndarray) -> None:
    """SwiGLU in place: gate = silu(gate) * up, silu(z) = z / (1 + exp(-z)); float32 [n_tok, n_ff]. With SIMD the
    exp is simd.exp_f, 16 lanes at a time (Numba's scalar exp made this op a visible part of a token)."""
    if simd.ISA != "none" and gate.shape[1] % 16 == 0:
        _silu_mul_simd(gate, up)
    else:
        _silu_mul(gate, up)


@njit(**JIT)
def _silu_mul_row(g, u):
    one = splat_f(1.0)
    for b in range(g.shape[0] // 16):
        z = load_f(g, 16 * b)
        store_f(g, 16 * b, fmul(fdiv(z, fadd(one, exp_f(fsub(splat_f(0.0), z)))), load_f(u, 16 * b)))


@njit(**JIT_PARALLEL)
def _silu_mul_rows(gate, up):
    for t in prange(gate.shape[0]):
        _silu_mul_row(gate[t], up[t])


@njit(**JIT)
def _silu_mul_simd(gate, up):
    if gate.shape[0] == 1:
        _silu_mul_row(gate[0], up[0])
    else:
        _silu_mul_rows(gate, up)


@njit(**JIT_PARALLEL)
def _silu_mul(gate, up):
    for t in prange(gate.shape[0]):
        g, u = gate[t], up[t]
        for i in range(g.shape[0]):
            z = g[i]
            g[i] = z / (np.float32(1.0) + np.exp(-z)) * u[i]


@njit(**JIT_PARALLEL)
def _add_rows(x, y):
    for t in prange(x.shape[0]):
        _add_row(x[t], y[t])


@njit(**JIT)
def add(x, y):
    """In place x += y (residual connections), float32 [n_tok, n]."""
    if x.shape[0] == 1:
        _add_row(x[0], y[0])
    else:
        _add_rows(x, y)


def rope_kv(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, n_rot: int, freq_base: float,
            freq_scale: float, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int,
            freq_factors: np.ndarray | None = None) -> None:
    """RoPE on q and k (float32 [n, heads, head_dim], in place), then k and v into the fp16 caches at n_past
    (see rope, store_kv): one Numba call with SIMD, where four separate ones each pay a cold call after a weight
    stream."""
    if simd.ISA != "none" and k.shape[2] % 16 == 0:
        _rope_kv_simd(q, k, v, pos, n_rot, freq_base, freq_scale, k_cache, v_cache, n_past, freq_factors)
    else:
        rope(q, pos, n_rot, freq_base, freq_scale, freq_factors)
        rope(k, pos, n_rot, freq_base, freq_scale, freq_factors)
        store_kv(k, k_cache, n_past)
        store_kv(v, v_cache, n_past)


@njit(**JIT)
def _rope_kv_simd(q, k, v, pos, n_rot, freq_base, freq_scale, k_cache, v_cache, n_past, freq_factors):
    rope(q, pos, n_rot, freq_base, freq_scale, freq_factors)
    rope(k, pos, n_rot, freq_base, freq_scale, freq_factors)
    _store_kv_simd(k, k_cache, n_past)
    _store_kv_simd(v, v_cache, n_past)


def store_kv(x: np.ndarray, cache: np.ndarray, n_past: int) -> None:
    """cache[g, n_past + t] = fp16 bits of x[t, g] (x: float32 [n, n_head_kv, head_dim], C-contiguous; cache: uint16
    [n_head_kv, n_ctx, head_dim]): the new keys or values of one layer written straight into the fp16 cache."""
    if simd.ISA != "none" and x.shape[2] % 16 == 0:
        _store_kv_simd(x, cache, n_past)
    else:
        cache[:, n_past:n_past + x.shape[0]] = f32_to_f16_bits(x.transpose(1, 0, 2))


@njit(**JIT)
def _store_kv_simd(x, cache, n_past):
    n, n_kv_head, head_dim = x.shape
    for t in range(n):
        for g in range(n_kv_head):
            src, dst = x[t, g], cache[g, n_past + t]
            for c in range(head_dim // 16):
                store_h16(dst, 16 * c, load_f(src, 16 * c))


def f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit patterns as uint16 (round to nearest even), for writing the KV cache."""
    with np.errstate(over="ignore"):          # beyond 65504 is inf in fp16, as in llama.cpp's cache
        return x.astype(np.float16).view(np.uint16)
