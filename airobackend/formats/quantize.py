"""Numpy quantizers for every weight type, following llama.cpp's reference quantizers (`quantize_row_*_ref` in
ggml-quants.c, the code `llama-quantize` runs without an importance matrix).

They are written to give the same bytes as llama.cpp: every operation is float32 in the C order of evaluation,
C's running sums are reproduced with sequential (cumulative) float32 sums rather than numpy's pairwise ones,
`nearest_int` is round-half-to-even (np.rint), `(int8_t)(x + 8.5f)` is truncation, `roundf` is half away from zero.
The work is vectorized across blocks (and sub-blocks); loops run only over the search steps of the k-quants.

    raw = quantize(values_f32, GGMLType.Q4_K)     # values [n_rows, n_cols] (or 1-D); n_cols a multiple of the block
"""
from __future__ import annotations

import numpy as np

from ..quant import BLOCK, GGMLType

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)


def quantize(values: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """Raw blocks (uint8, 1-D) of `values` (float32, rows of a multiple of the block size) in `ggml_type`."""
    t = GGMLType(ggml_type)
    x = np.ascontiguousarray(values, dtype=np.float32)
    per_block, nbytes = BLOCK[t]
    if x.ndim == 0 or x.shape[-1] % per_block:
        raise ValueError(f"row length {x.shape[-1] if x.ndim else 0} is not a multiple of the {t.name} block "
                         f"({per_block})")
    flat = x.reshape(-1)
    if t == GGMLType.F32:
        return flat.view(np.uint8).copy()
    if t == GGMLType.F16:
        return flat.astype(np.float16).view(np.uint8)
    fn = _QUANTIZERS.get(t)
    if fn is None:
        raise ValueError(f"no quantizer for {t.name}")
    blocks = flat.reshape(-1, per_block)
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    step = max(1, (1 << 20) // per_block)      # bound temporaries to a few MB per array
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = fn(blocks[s:s + step])
    return out.reshape(-1)


# ---- helpers ---------------------------------------------------------------------------------------------------

def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum along the last axis in sequential float32 order (C's `for (...) s += a[i]`): one vector add per
    element position, across all rows at once (numpy's own sum is pairwise and rounds differently)."""
    a = np.asarray(a, dtype=f32)
    acc = a[..., 0].copy()
    for i in range(1, a.shape[-1]):
        acc += a[..., i]
    return acc


def _nint(a: np.ndarray) -> np.ndarray:
    """llama.cpp nearest_int: round half to even."""
    return np.rint(a).astype(np.int32)


def _fp16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=f32).astype(np.float16)


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return _fp16(a).reshape(-1, 1).view(np.uint8)


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, the element with that magnitude, first occurrence) along the last axis."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=-1)[..., None]
    return np.take_along_axis(ax, idx, -1)[..., 0], np.take_along_axis(x, idx, -1)[..., 0]


def _safe_inv(d: np.ndarray) -> np.ndarray:
    return np.where(d != 0, f32(1.0) / np.where(d != 0, d, f32(1)), f32(0)).astype(f32)


def _round_half_away(a: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero."""
    r = np.rint(a)
    tie = np.abs(a - np.trunc(a)) == f32(0.5)
    return np.where(tie, np.trunc(a) + np.sign(a), r)


# ---- 32-weight blocks -------------------------------------------------------------------------------------------

def _q4_0(x: np.ndarray) -> np.ndarray:
    _, mx = _signed_absmax(x)
    d = (mx / f32(-8)).astype(f32)
    idv = _safe_inv(d)
    q = np.minimum(15, np.trunc(x * idv[:, None] + f32(8.5)).astype(np.int32)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = ((mx - mn) / f32(15)).astype(f32)
    idv = _safe_inv(d)
    q = np.minimum(15, np.trunc((x - mn[:, None]) * idv[:, None] + f32(0.5)).astype(np.int32)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _pack_q5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    bits = ((q >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qs.astype(np.uint8), qh.astype("<u4").reshape(-1, 1).view(np.uint8)


def _q5_0(x: np.ndarray) -> np.ndarray:
    _, mx = _signed_absmax(x)
    d = (mx / f32(-16)).astype(f32)
    idv = _safe_inv(d)
    q = np.minimum(31, np.trunc(x * idv[:, None] + f32(16.5)).astype(np.int32)).astype(np.uint8)
    qs, qh = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = ((mx - mn) / f32(31)).astype(f32)
    idv = _safe_inv(d)
    q = np.trunc((x - mn[:, None]) * idv[:, None] + f32(0.5)).astype(np.int32).astype(np.uint8)
    qs, qh = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), qh, qs], axis=1)


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = (amax / f32(127)).astype(f32)
    idv = _safe_inv(d)
    q = _round_half_away(x * idv[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


# ---- k-quant building blocks (vectorized over rows = sub-blocks) ----------------------------------------------

def _make_qx_quants(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for each row of X. Returns (scale, L in 0..2*nmax-1)."""
    amax, mx = _signed_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx).astype(f32)
    w = X * X

    def trial(iscale):
        l = np.clip(_nint(iscale[:, None] * X), -nmax, nmax - 1).astype(f32)
        return l, _seqsum(w * X * l), _seqsum(w * l * l)

    iscale = (f32(-nmax) / mx).astype(f32)
    l, sumlx, suml2 = trial(iscale)
    L = (l + nmax).astype(np.int32)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0)).astype(f32)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        iscale = (-(f32(nmax) + f32(0.1) * f32(i)) / mx).astype(f32)
        l, sumlx, suml2 = trial(iscale)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if upd.any():
            L[upd] = (l[upd] + nmax).astype(np.int32)
            scale = np.where(upd, sumlx / np.where(upd, suml2, f32(1)), scale).astype(f32)
            best = np.where(upd, scale * sumlx, best).astype(f32)
    L[zero] = 0
    scale[zero] = 0
    return scale, L


def _make_q3_quants(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for each row of X. Returns (scale, L in 0..2*nmax-1)."""
    amax, mx = _signed_absmax(X)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx).astype(f32)
    iscale = (f32(-nmax) / mx).astype(f32)
    L = np.clip(_nint(iscale[:, None] * X), -nmax, nmax - 1).astype(np.int32)
    w = X * X
    Lf = L.astype(f32)
    sumlx = _seqsum(w * X * Lf)
    suml2 = _seqsum(w * Lf * Lf)
    n = X.shape[1]
    for _ in range(5):
        for i in range(n):
            xi, wi, li = X[:, i], w[:, i], L[:, i].astype(f32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new_l = np.clip(_nint(xi * sl2 / np.where(pos, slx, f32(1))), -nmax, nmax - 1)
            nl = new_l.astype(f32)
            chg = pos & (new_l != L[:, i])
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            acc = chg & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if acc.any():
                L[acc, i] = new_l[acc]
                sumlx = np.where(acc, slx2, sumlx).astype(f32)
                suml2 = np.where(acc, sl22, suml2).astype(f32)
    scale = (sumlx / np.where(suml2 != 0, suml2, f32(1))).astype(f32)
    L = L + nmax
    L[zero] = 0
    scale[zero] = 0
    return scale, L


def _make_qkx2_quants(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants for each row. Returns (scale, the_min (= -min, >= 0), L in 0..nmax)."""
    mn = np.minimum(X.min(axis=1), f32(0)).astype(f32)
    mx = X.max(axis=1)
    sum_w = _seqsum(W)
    sum_x = _seqsum(W * X)
    flat = mx == mn

    def err(scale, mnv, l):
        diff = (scale[:, None] * l + mnv[:, None]) - X
        diff = np.abs(diff) if use_mad else diff * diff
        return _seqsum(W * diff)

    rng = np.where(flat, f32(1), mx - mn).astype(f32)
    iscale = (f32(nmax) / rng).astype(f32)
    scale = (f32(1) / iscale).astype(f32)
    L = np.clip(_nint(iscale[:, None] * (X - mn[:, None])), 0, nmax)
    best = err(scale, mn, L.astype(f32))
    for i in range(nstep + 1):
        rng = np.where(flat, f32(1), mx - mn).astype(f32)
        iscale = ((f32(rmin) + f32(rdelta) * f32(i) + f32(nmax)) / rng).astype(f32)
        la = np.clip(_nint(iscale[:, None] * (X - mn[:, None])), 0, nmax)
        lf = la.astype(f32)
        sum_l = _seqsum(W * lf)
        sum_l2 = _seqsum(W * lf * lf)
        sum_xl = _seqsum(W * lf * X)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = ((sum_w * sum_xl - sum_x * sum_l) / Ds).astype(f32)
        this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / Ds).astype(f32)
        posm = this_min > 0
        this_min = np.where(posm, f32(0), this_min).astype(f32)
        this_scale = np.where(posm, sum_xl / np.where(sum_l2 != 0, sum_l2, f32(1)), this_scale).astype(f32)
        mad = err(this_scale, this_min, lf)
        upd = ok & (mad < best) & ~flat
        if upd.any():
            L[upd] = la[upd]
            best = np.where(upd, mad, best).astype(f32)
            scale = np.where(upd, this_scale, scale).astype(f32)
            mn = np.where(upd, this_min, mn).astype(f32)
    L[flat] = 0
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-mn).astype(f32), L


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6 for j = 0, 128."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    q = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return q.reshape(-1, 64)


# ---- k-quants (256-weight super-blocks) ------------------------------------------------------------------------

def _q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    X = x.reshape(-1, 16)
    scales, mins, L = _make_qkx2_quants(X, np.abs(X), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    hs, hm = max_scale > 0, max_min > 0
    isc = np.where(hs, f32(15) / np.where(hs, max_scale, f32(1)), f32(0)).astype(f32)
    imn = np.where(hm, f32(15) / np.where(hm, max_min, f32(1)), f32(0)).astype(f32)
    sc = np.where(hs[:, None], _nint(isc[:, None] * scales), 0)
    mq = np.where(hm[:, None], _nint(imn[:, None] * mins), 0)
    sbytes = ((sc & 0xFF) | (mq << 4)).astype(np.uint8)
    d = _fp16(np.where(hs, max_scale / f32(15), f32(0)))
    dmin = _fp16(np.where(hm, max_min / f32(15), f32(0)))
    dd = d.astype(f32)[:, None] * (sbytes & 0xF).astype(f32)
    dm = dmin.astype(f32)[:, None] * (sbytes >> 4).astype(f32)
    Xb = x.reshape(nb, 16, 16)
    nz = dd != 0
    lq = np.clip(_nint((Xb + dm[:, :, None]) / np.where(nz, dd, f32(1))[:, :, None]), 0, 3)
    L = np.where(nz[:, :, None], lq, L).reshape(nb, 256)
    return np.concatenate([sbytes, _pack_2bit(L), d.reshape(-1, 1).view(np.uint8),
                           dmin.reshape(-1, 1).view(np.uint8)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(-1, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    amax, max_scale = _signed_absmax(scales)
    has = max_scale != 0
    iscale = np.where(has, f32(-32) / np.where(has, max_scale, f32(1)), f32(0)).astype(f32)
    l = (np.clip(_nint(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
    l = np.where(has[:, None], l, 0).astype(np.uint8)
    sb = np.zeros((nb, 12), np.uint8)
    sb[:, :8] = l[:, :8] & 0xF
    sb[:, :8] |= (l[:, 8:] & 0xF) << 4
    hi = l >> 4
    for j in range(16):
        sb[:, 8 + j % 4] |= (hi[:, j] << (2 * (j // 4))).astype(np.uint8)
    d = _fp16(np.where(has, f32(1) / np.where(has, iscale, f32(1)), f32(0)))
    # decode the 6-bit scales back, exactly as the reference does
    lo = np.concatenate([sb[:, :8] & 0xF, sb[:, :8] >> 4], axis=1).astype(np.int32)
    hb = np.stack([(sb[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1).astype(np.int32)
    sc = (lo | (hb << 4)) - 32
    dd = d.astype(f32)[:, None] * sc.astype(f32)
    nz = dd != 0
    Xb = x.reshape(nb, 16, 16)
    lq = np.clip(_nint(Xb / np.where(nz, dd, f32(1))[:, :, None]), -4, 3) + 4
    L = np.where(nz[:, :, None], lq, L).reshape(nb, 256)
    high = L > 3
    L = np.where(high, L - 4, L)
    # hmask[m] bit b <- element 32*b + m
    hmask = (high.reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
        axis=1, dtype=np.uint8)
    return np.concatenate([hmask, _pack_2bit(L), sb, d.reshape(-1, 1).view(np.uint8)], axis=1)


def _kx_scales(scales: np.ndarray, mins: np.ndarray):
    """Q4_K/Q5_K: 6-bit scale and min per 32-sub-block packed in 12 bytes + fp16 d, dmin; and decoded sc, m."""
    nb = scales.shape[0]
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_s = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0)).astype(f32)
    inv_m = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0)).astype(f32)
    ls = np.minimum(63, _nint(inv_s[:, None] * scales).astype(np.uint8)).astype(np.uint8)
    lm = np.minimum(63, _nint(inv_m[:, None] * mins).astype(np.uint8)).astype(np.uint8)
    sb = np.zeros((nb, 12), np.uint8)
    for j in range(8):
        if j < 4:
            sb[:, j] = ls[:, j]
            sb[:, j + 4] = lm[:, j]
        else:
            sb[:, j + 4] = (ls[:, j] & 0xF) | ((lm[:, j] & 0xF) << 4)
            sb[:, j - 4] |= (ls[:, j] >> 4) << 6
            sb[:, j] |= (lm[:, j] >> 4) << 6
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))
    sc = np.empty((nb, 8), np.int32)
    m = np.empty((nb, 8), np.int32)
    for j in range(8):       # get_scale_min_k4
        if j < 4:
            sc[:, j] = sb[:, j] & 63
            m[:, j] = sb[:, j + 4] & 63
        else:
            sc[:, j] = (sb[:, j + 4] & 0xF) | ((sb[:, j - 4] >> 6) << 4)
            m[:, j] = (sb[:, j + 4] >> 4) | ((sb[:, j] >> 6) << 4)
    head = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), sb], axis=1)
    return head, d, dmin, sc, m


def _qk_common(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    nb = x.shape[0]
    X = x.reshape(-1, 32)
    av_x = np.sqrt(_seqsum(X * X) / f32(32)).astype(f32)
    W = av_x[:, None] + np.abs(X)
    scales, mins, L = _make_qkx2_quants(X, W, nmax, rmin, 0.1, nstep, False)
    head, d, dmin, sc, m = _kx_scales(scales.reshape(nb, 8), mins.reshape(nb, 8))
    dd = d.astype(f32)[:, None] * sc.astype(f32)
    dm = dmin.astype(f32)[:, None] * m.astype(f32)
    nz = dd != 0
    Xb = x.reshape(nb, 8, 32)
    lq = np.clip(_nint((Xb + dm[:, :, None]) / np.where(nz, dd, f32(1))[:, :, None]), 0, nmax)
    L = np.where(nz[:, :, None], lq, L.reshape(nb, 8, 32)).reshape(nb, 256)
    return head, L


def _q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _qk_common(x, 15, -1.0, 20)
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    q = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, q], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _qk_common(x, 31, -0.5, 15)
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)           # group g: elements 64g + [0..31], 64g + 32 + [0..31]
    lo = L & 0xF
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hb = (L >> 4) & 1                                      # [nb, 4, 2, 32]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :,
                                                                                                   None]
    qh = (hb << shifts).reshape(-1, 8, 32).sum(axis=1, dtype=np.uint8)
    return np.concatenate([head, qh, ql], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(-1, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    amax, max_scale = _signed_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = (f32(-128) / np.where(zero, f32(1), max_scale)).astype(f32)
    d = _fp16(f32(1) / iscale)
    sc = np.minimum(127, _nint(iscale[:, None] * scales)).astype(np.int8)
    dd = d.astype(f32)[:, None] * sc.astype(f32)
    nz = dd != 0
    Xb = x.reshape(nb, 16, 16)
    lq = np.clip(_nint(Xb / np.where(nz, dd, f32(1))[:, :, None]), -32, 31) + 32
    L = np.where(nz[:, :, None], lq, L).reshape(nb, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    out[zero] = 0
    return out


_QUANTIZERS = {
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1, GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k,
}
