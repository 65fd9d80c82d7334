"""The fast kernels' weight layouts: the file's rows turned into the layout a type's kernel reads, once at load.

The legacy 32-weight types go into groups of 4 blocks (quants contiguous, then the fp16 scales, then q5's high bits
as 64-bit lane masks), exactly the file's size, one stream per row; q4_0 and q8_0 rows of (nearly) whole 16-block
groups into the wide groups of specs.Q4_0W / Q8_0W (one block per i32 lane), the last group padded with zero blocks.
q2_K and q3_K (`repack_k2`), q4_K and q5_K (`repack_k4`) are reordered so that every i32 lane of a dot product holds
one 16-weight sub-block (q3_K's scales re-packed for a two-op decode with AVX-512 VBMI, else pre-decoded into 114-byte
blocks), q6_K likewise (`repack_k6`, same size); see kernels/specs.py for the layouts the kernels expect. F16 is read
in place. After a copy, the file pages it read are released from the process (`release_pages`).
"""
from __future__ import annotations

import mmap

import numba
import numpy as np

from . import q8, simd


def to_kernel_layout(spec, raw2d: np.ndarray, n_blk: int) -> np.ndarray | None:
    """The rows of raw2d (uint8[n_rows, file row bytes]) in `spec`'s kernel layout, or None for a type read in
    place (`spec.repack_with` None)."""
    if spec.repack_with is None:
        return None
    kind, options = spec.repack_with
    if kind == "legacy":
        return repack_legacy(spec, raw2d, n_blk)
    return {"k2": repack_k2, "k4": repack_k4, "k6": repack_k6}[kind](raw2d, n_blk, **options)


@numba.jit(**dict(q8.JITQ, parallel=True))
def _repack(raw, n_blk, block_bytes, group_blocks, src_blk, src_off, out):
    """out[r, group bytes] from raw[r] blocks via the per-group byte map (src_blk, src_off); missing blocks 0."""
    gb = src_blk.shape[0]
    for r in numba.prange(raw.shape[0]):
        for g in range(out.shape[1] // gb):
            for k in range(gb):
                b = group_blocks * g + src_blk[k]
                out[r, g * gb + k] = raw[r, b * block_bytes + src_off[k]] if b < n_blk else 0


# The sub-block-lane order of `_K2` (q2_K/q3_K): new byte 4k + b, shift 2p <- weight 16k + 4p + b. For k = 8h + 2j + s
# those weights sit in the file's bytes 32h + 16s + 4p + b at shift 2j, so i32 lane k of the new 64 bytes takes lane
# 8h + 4s + p of the old 64 shifted right by 2j, for p = 0..3 (a 4 x 4 transpose of 2-bit fields, one vpermd,
# vpsrlvd, vpand and a shifted OR per p). q3_K's high bits: those of new position m = 4k + b (h = m // 32 = k // 8)
# come from the file's byte 16s + 4p + b (of 32), bit 4h + j.
_LP = [simd.make_lanes([8 * (k >> 3) + 4 * (k & 1) + p for k in range(16)]) for p in range(4)]
_LQ0, _LQ1, _LQ2, _LQ3 = _LP
_LH = [simd.make_lanes([4 * (k & 1) + p for k in range(16)]) for p in range(4)]
_LH0, _LH1, _LH2, _LH3 = _LH
_LHI = simd.make_lanes([8 + (k & 7) for k in range(16)])
_SUB_CONST = np.array([[2 * ((k >> 1) & 3) for k in range(16)],             # qs: right shift 2j
                       [4 * (k >> 3) + ((k & 7) >> 1) for k in range(16)]],  # hmask: right shift 4h + j
                      dtype=np.int32)


@numba.jit(**q8.JITQ)
def _gather_fields(a0, a1, a2, a3, sh, mask, width):
    """Lane-wise (a_p >> sh) & mask placed at bit width * p, ORed over p = 0..3 (the a_p already lane-permuted)."""
    f0 = simd.vand(simd.vshrv(a0, sh), mask)
    f1 = simd.vshl(simd.vand(simd.vshrv(a1, sh), mask), width)
    f2 = simd.vshl(simd.vand(simd.vshrv(a2, sh), mask), 2 * width)
    f3 = simd.vshl(simd.vand(simd.vshrv(a3, sh), mask), 3 * width)
    return simd.vor(simd.vor(f0, f1), simd.vor(f2, f3))


@numba.jit(**q8.JITQ)
def _sub_q(raw, qi, C):
    """The 2-bit fields of one super-block (64 bytes at raw[qi]) in the `_K2` order: bits 2p of byte m = part p."""
    w = simd.load_i(raw, qi)
    return _gather_fields(_LQ0(w), _LQ1(w), _LQ2(w), _LQ3(w), simd.load_i(C, 0), simd.splat_i(0x03030303), 2)


@numba.jit(**q8.JITQ)
def _sub_h(raw, hi, C):
    """q3_K's high bits (32 bytes at raw[hi]) in the `_K2` order: bit p of byte m = part p's high bit at m."""
    g = simd.load_i_dup256(raw, hi)
    return _gather_fields(_LH0(g), _LH1(g), _LH2(g), _LH3(g), simd.load_i(C, 16), simd.splat_i(0x01010101), 1)


@numba.jit(**q8.JITQ)
def _q3_value(q, h, p):
    """Part p's 3-bit quants per byte: its 2-bit field of q (bits 2p) plus 4 times its high bit of h (bit p)."""
    return simd.vor(simd.vand(simd.vshr(q, 2 * p), simd.splat_i(0x03030303)),
                    simd.vshl(simd.vand(simd.vshr(h, p), simd.splat_i(0x01010101)), 2))


@numba.jit(**q8.JITQ)
def _q3_fields(raw, qi, hi, out, o, C):
    """One q3_K super-block's quants as Q3_K's 96 bytes at out[o] (see Q3_K): n_p = low 2 bits + 4 * high bit of part
    p, X = n0 | n1 << 3 | (n2 & 3) << 6 (64 bytes), then Y (32 bytes): n2's bit 2 and n3 for positions m and 32 + m."""
    q, h = _sub_q(raw, qi, C), _sub_h(raw, hi, C)
    m1, m3 = simd.splat_i(0x01010101), simd.splat_i(0x03030303)
    n0, n1, n2, n3 = _q3_value(q, h, 0), _q3_value(q, h, 1), _q3_value(q, h, 2), _q3_value(q, h, 3)
    simd.store_i(out, o, simd.vor(simd.vor(n0, simd.vshl(n1, 3)), simd.vshl(simd.vand(n2, m3), 6)))
    t = simd.vor(simd.vand(simd.vshr(n2, 2), m1), simd.vshl(n3, 2))
    th = _LHI(t)
    y = simd.vor(t, simd.vor(simd.vshl(simd.vand(th, m1), 1), simd.vshl(simd.vand(th, simd.splat_i(0x1C1C1C1C)), 3)))
    simd.store_i_lo256(out, o + 64, y)


_Q3K_BITS = np.array([simd.q3k_scale_bit(k) for k in range(16)], dtype=np.int64)   # where load_q3k_scales reads


@numba.jit(**q8.JITQ)
def _q3_scale(src, i, k):
    """Scale k of the q3_K block at src[i], minus 32 (-32..31): llama.cpp's unpacking of the 12 bytes (`k_quants.c`
    at dadbed9)."""
    lo = (np.int64(src[i + 96 + k % 8]) >> (4 * (k // 8))) & 15
    hi = (np.int64(src[i + 104 + k % 4]) >> (2 * (k // 4))) & 3
    return (lo | (hi << 4)) - 32


@numba.jit(**dict(q8.JITQ, parallel=True))
def _repack_k2(raw, n_blk, q3, packed, out, C):
    ib, ob = (110, 110 if packed else 114) if q3 else (84, 84)
    for r in numba.prange(raw.shape[0]):
        src, dst = raw[r], out[r]
        for b in range(n_blk):
            i, o = b * ib, b * ob
            if q3 and packed:                       # Q3_K: [scales 6][d 2][scales 6][X 64][Y 32]
                _q3_fields(src, i + 32, i, dst, o + 14, C)
                lo_half, hi_half = 0, 0
                for k in range(16):
                    f = _q3_scale(src, i, k) & 63   # 6-bit two's complement
                    if k % 4 < 2:
                        lo_half |= f << _Q3K_BITS[k]
                    else:
                        hi_half |= f << _Q3K_BITS[k]
                for j in range(6):
                    dst[o + j] = np.uint8((lo_half >> (8 * j)) & 0xFF)
                    dst[o + 8 + j] = np.uint8((hi_half >> (8 * j)) & 0xFF)
                dst[o + 6] = src[i + 108]           # d
                dst[o + 7] = src[i + 109]
            elif q3:                                # Q3_K_I8: [X 64][Y 32][scales 16][d 2]
                _q3_fields(src, i + 32, i, dst, o, C)
                for k in range(16):
                    dst[o + 96 + k] = np.uint8(_q3_scale(src, i, k) & 0xFF)
                dst[o + 112] = src[i + 108]         # d
                dst[o + 113] = src[i + 109]
            else:
                simd.store_i(dst, o + 16, _sub_q(src, i + 16, C))
                for k in range(16):                 # scales / mins
                    dst[o + k] = src[i + k]
                for k in range(80, 84):             # d, dmin
                    dst[o + k] = src[i + k]


def repack_k2(raw2d: np.ndarray, n_blk: int, q3: bool, packed: bool = True) -> np.ndarray:
    """q2_K rows (84-byte blocks, same size out) or q3_K rows (110-byte blocks; packed: same size, else 114 with the
    scales as int8) -> the kernel layouts of Q2_K / Q3_K / Q3_K_I8."""
    ob = (110 if packed else 114) if q3 else 84
    out = np.empty((raw2d.shape[0], n_blk * ob), dtype=np.uint8)
    _repack_k2(np.ascontiguousarray(raw2d), n_blk, q3, packed, out, _SUB_CONST.reshape(-1))
    return out


# q4_K/q5_K in the `_K2` lane order: part p byte 4k + b <- weight 16k + 4p + b (so i32 lane k of every part lies in
# the 32-weight sub-block k // 2), two parts per byte (chunk c = part 2c | part 2c + 1 << 4). Those four weights are
# the four nibbles of the file's qs lane 8j + 4 (k % 2) + p (j = k // 4) at shift 4 ((k % 4) // 2): per part one
# vpermt2d over the file's two 64-byte halves, a vpsrlvd and a vpand.
_K4_LANES = [simd.make_lanes2([8 * (k // 4) + 4 * (k % 2) + p for k in range(16)]) for p in range(4)]
_K4L0, _K4L1, _K4L2, _K4L3 = _K4_LANES
_K4_SHIFT = np.array([4 * ((k % 4) // 2) for k in range(16)], dtype=np.int32)


@numba.jit(**q8.JITQ)
def _k4_nibbles(f0, f1, p, sh):
    m4 = simd.splat_i(0x0F0F0F0F)
    g = _K4L0(f0, f1) if p == 0 else (_K4L1(f0, f1) if p == 1 else (_K4L2(f0, f1) if p == 2 else _K4L3(f0, f1)))
    return simd.vand(simd.vshrv(g, sh), m4)


@numba.jit(**dict(q8.JITQ, parallel=True))
def _repack_k4(raw, n_blk, q5, out, C, SH):
    bb = 176 if q5 else 144
    qo = 48 if q5 else 16
    for r in numba.prange(raw.shape[0]):
        src, dst = raw[r], out[r]
        sh = simd.load_i(SH, 0)
        for b in range(n_blk):
            i = b * bb
            for k in range(16):                         # d, dmin, the 12 packed scales: as they are
                dst[i + k] = src[i + k]
            f0, f1 = simd.load_i(src, i + qo), simd.load_i(src, i + qo + 64)
            for c in range(2):
                lo, hi = _k4_nibbles(f0, f1, 2 * c, sh), _k4_nibbles(f0, f1, 2 * c + 1, sh)
                simd.store_i(dst, i + qo + 64 * c, simd.vor(lo, simd.vshl(hi, 4)))
            if q5:                                      # high bits: bit p / 4 + p of byte m = part p at m / 32 + m
                h = _sub_h(src, i + 16, C)
                simd.store_i_lo256(dst, i + 16, simd.vor(simd.vand(h, simd.splat_i(0x0F0F0F0F)),
                                                         simd.vshl(_LHI(h), 4)))


def repack_k4(raw2d: np.ndarray, n_blk: int, q5: bool) -> np.ndarray:
    """q4_K (144-byte) or q5_K (176-byte) rows -> the same-size kernel layout of Q4_K / Q5_K (see there)."""
    out = np.empty((raw2d.shape[0], n_blk * (176 if q5 else 144)), dtype=np.uint8)
    _repack_k4(np.ascontiguousarray(raw2d), n_blk, q5, out, _SUB_CONST.reshape(-1), _K4_SHIFT)
    return out


# q6_K in the `_K2` lane order (Q6_K): position m = 4k + b of part p holds weight 16k + 4p + b. In the file (llama.cpp's
# block_q6_K) weight w = 128h + 32g + l has its low 4 bits in ql[64h + 32(g & 1) + l] at shift 4(g >> 1) and its high
# 2 bits in qh[32h + l] at shift 2g. For w = 16k + 4p + b (h = k >> 3, g = (k >> 1) & 3, l = 16(k & 1) + 4p + b) both
# are whole i32 lanes of the file: per part one vpermt2d over ql's two 64-byte halves (or one vpermd of qh), a vpsrlvd
# and a vpand.
_K6_LO = [simd.make_lanes2([16 * (k >> 3) + 8 * ((k >> 1) & 1) + 4 * (k & 1) + p for k in range(16)]) for p in range(4)]
_K6L0, _K6L1, _K6L2, _K6L3 = _K6_LO
_K6_HI = [simd.make_lanes([8 * (k >> 3) + 4 * (k & 1) + p for k in range(16)]) for p in range(4)]
_K6H0, _K6H1, _K6H2, _K6H3 = _K6_HI
_K6_SHIFT = np.array([[4 * ((k >> 2) & 1) for k in range(16)], [2 * ((k >> 1) & 3) for k in range(16)]],
                     dtype=np.int32)


@numba.jit(**q8.JITQ)
def _k6_part(f0, f1, qh, p, sl, sh):
    """Part p's 6-bit quants (0..63) per byte, in the `_K2` order."""
    if p == 0:
        lo, hi = _K6L0(f0, f1), _K6H0(qh)
    elif p == 1:
        lo, hi = _K6L1(f0, f1), _K6H1(qh)
    elif p == 2:
        lo, hi = _K6L2(f0, f1), _K6H2(qh)
    else:
        lo, hi = _K6L3(f0, f1), _K6H3(qh)
    return simd.vor(simd.vand(simd.vshrv(lo, sl), simd.splat_i(0x0F0F0F0F)),
                    simd.vshl(simd.vand(simd.vshrv(hi, sh), simd.splat_i(0x03030303)), 4))


@numba.jit(**dict(q8.JITQ, parallel=True))
def _repack_k6(raw, n_blk, out, SH):
    m4, m3 = simd.splat_i(0x0F0F0F0F), simd.splat_i(0x03030303)
    for r in numba.prange(raw.shape[0]):
        src, dst = raw[r], out[r]
        sl, sh = simd.load_i(SH, 0), simd.load_i(SH, 16)
        for b in range(n_blk):
            i = b * 210
            f0, f1, qh = simd.load_i(src, i), simd.load_i(src, i + 64), simd.load_i(src, i + 128)
            hb = simd.splat_i(0)
            for p in range(4):
                n = _k6_part(f0, f1, qh, p, sl, sh)
                hb = simd.vor(hb, simd.vshl(simd.vand(simd.vshr(n, 4), m3), 2 * p))
                if p % 2 == 0:
                    lo = simd.vand(n, m4)
                else:
                    simd.store_i(dst, i + 32 * (p - 1), simd.vor(lo, simd.vshl(simd.vand(n, m4), 4)))
            simd.store_i(dst, i + 128, hb)
            for k in range(192, 210):                   # the 16 int8 scales (sub-block k = weights 16k..), d
                dst[i + k] = src[i + k]


def repack_k6(raw2d: np.ndarray, n_blk: int) -> np.ndarray:
    """q6_K rows (210-byte blocks) -> the same-size kernel layout of Q6_K: [low nibbles of parts 0 | 1 << 4: 64]
    [parts 2 | 3 << 4: 64][high 2 bits of part p at bits 2p: 64][scales 16][d 2]."""
    out = np.empty((raw2d.shape[0], n_blk * 210), dtype=np.uint8)
    _repack_k6(np.ascontiguousarray(raw2d), n_blk, out, _K6_SHIFT.reshape(-1))
    return out


def repack_legacy(spec, raw2d: np.ndarray, n_blk: int) -> np.ndarray:
    """Legacy 32-weight rows -> groups of `spec.group_blocks` blocks (4, or 16 for the wide layouts) by the spec's
    byte map `repack` (quants contiguous, then the fp16 scales, then q5's high bits as 64-bit lane masks): the
    file's size, one stream per row; missing blocks of the last group 0."""
    gb = spec.group_blocks
    n_grp = (n_blk + gb - 1) // gb
    src_blk = np.array([b for b, _ in spec.repack], dtype=np.int64)
    src_off = np.array([o for _, o in spec.repack], dtype=np.int64)
    assert len(spec.repack) == spec.step_bytes
    out = np.empty((raw2d.shape[0], n_grp * spec.step_bytes), dtype=np.uint8)
    _repack(raw2d, n_blk, spec.block_bytes, gb, src_blk, src_off, out)
    return out


# ------------------------------------------------------------------------------------ the file's pages
def mapping_of(a) -> mmap.mmap | None:
    """The mmap (the model file's mapping) an array's memory lies in, following .base / memoryview.obj; or None."""
    for _ in range(16):
        if isinstance(a, mmap.mmap):
            return a
        nxt = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
        if nxt is None:
            return None
        a = nxt
    return None


def file_backed(a) -> bool:
    """Whether an array's memory lies in a file mapping (the model file, read in place)."""
    return mapping_of(a) is not None


def release_pages(a: np.ndarray) -> None:
    """Drop the whole pages of a contiguous array that lies in a read-only file mapping from this process's page
    tables (MADV_DONTNEED; the file stays in the page cache). After a repack nothing reads them, and without this
    the process keeps both the copy and the file pages resident, nearly twice the file in RSS. A hint only: pages
    that something reads again simply fault back in."""
    mm = mapping_of(a)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or not a.flags.c_contiguous:
        return
    try:
        start = a.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE              # whole pages only: neighbours may be in use
        hi = (start + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if 0 <= lo < hi <= len(mm):
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):       # a closed mapping, or a platform without it: nothing to release
        pass
