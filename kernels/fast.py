"""Fast quantized mat-vec / mat-mat kernels: int8 dot products as llama.cpp's CPU path does them.

Entry point: `prepare_fast(ggml_type, raw2d, n_rows, n_cols)` -> an object with `.matvec(x, out)` and
`.matmat(X, out)`, or None when this CPU or this type has no fast kernel (the generic f32 kernels are used then).

How it works
* The activation row is quantized once per call the way llama.cpp does it (kernels/q8.py: Q8_0 / Q8_1 for the legacy
  types, Q8_K for the k-quants, fp16 rounding for F16 weights), in a byte order chosen so that one 64-byte load of
  weight quants meets one 64-byte load of activation quants.
* Inner products run on integers with `vpdpbusd` / `vpmaddubsw`+`vpdpwssd` (AVX-512 VNNI) or `vpmaddubsw`+`vpmaddwd`
  (AVX2), emitted through llvmlite (kernels/simd.py); block scales are applied in float once per 128/256 weights.
* q6_K and F16 are read straight from the (mmapped) file bytes. q2_K, q3_K, q4_K and q5_K are repacked once at
  load so that every i32 lane of a dot product holds one 16-weight sub-block (q3_K's scales re-packed for a two-op
  decode with AVX-512 VBMI, else pre-decoded into 114-byte blocks; see `_K2`, `Q4_K`). The legacy 32-weight types
  are repacked once at load into groups of 4 blocks (quants contiguous, then the fp16 scales, then q5's high bits as
  64-bit lane masks): exactly the file's size, one stream per row. The file pages a repack read are then released
  from the process.
* Decode (`matvec`): `prange` over chunks of 32 rows, one row at a time (the single-row loop already outruns DRAM on
  one core). Prompt (`matmat`): all tokens quantized first, then `prange` over 32-row chunks, a register tile of
  R rows x 4 tokens (R = 4 for the legacy types and F16, 2 for the k-quants, whose per-sub-block scale vectors take
  more registers; 4 measured no faster), each weight vector decoded once per tile and used for 4 tokens.
* The unrolled kernel source is generated per type (for the chosen ISA) into a file under `source_dir()` (the
  application points it into its cache root) and imported from there, so Numba's `cache=True` works and an AVX2
  build never reuses an AVX-512 cache entry.

Threads: the kernels are `parallel=True`; the caller sets the count with `numba.set_num_threads`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np

from .ggml_types import GGMLType
from . import q8, simd, source_dir

__all__ = ["prepare_fast", "FastWeight", "supported_types", "ISA"]

ISA = simd.ISA
CHUNK = 32          # rows per prange chunk (a multiple of every tile height)
TILE_T = 4          # tokens per register tile in matmat
PF_DIST = 8192      # bytes of W the mat-vec prefetches ahead into L2 (simd.prefetch_l2; 8 and 16 KB measured alike)
# Row chunks a thread takes at a time (numba.set_parallel_chunksize around each kernel call: inside the kernel it would
# make Numba refuse to cache it; 0 = Numba's static split into one equal range per thread). Dynamic chunks let a
# thread whose vCPU runs fast take over the work of one that the host slows down: with one thread artificially 3x
# slower a test loop took 21.1 ms static vs 10.6 ms dynamic; a 65B layer's q3_K mat-vecs, 2 threads, interleaved
# 60 s: mean 25.9 -> 27.0 GB/s, 10th percentile 21.7 -> 23.9.
PAR_CHUNKS = 4


# =============================================================================================== per-type code
class Spec:
    """Code fragments of one weight type for the generator.

    Per step (128 weights for legacy types, 256 for k-quants, 16 for F16) the kernel runs `row_setup(i)` for each row
    of the tile, `tok_setup(j)` for each token, then for each part p: `row_part(i, p)`, `tok_part(j, p)` and
    `acc_part(i, j, p)`, and finally `acc_final(i, j)`. Names available: `wb{i}` (byte offset of the step in W),
    `xq{j}`, `xd{j}`, `xs{j}` (offsets of the step in XQ, XD, XS/XF), the constants of `consts`.
    """
    name = ""
    layout = ""         # activation layout: 'nib', 'k_nat', 'k_sub', 'f16'
    block_bytes = 0     # file bytes per block (weights per block = `block_w`)
    block_w = 32
    step_w = 128        # weights per kernel step
    step_bytes = 0      # bytes of (possibly repacked) W per step
    xq_step = 128
    xd_step = 4
    xs_step = 4
    parts = 1
    tile_r = 4
    tile_t = TILE_T
    mv_rows = 1         # rows per mat-vec step (2 measured 2x slower from DRAM: one stream per core streams best)
    prefetch_short = False  # prefetch short rows in anonymous memory too (see FastWeight._pf)
    consts: dict[str, str] = {}

    def row_setup(self, i):
        return []

    def tok_setup(self, j):
        return []

    def row_part(self, i, p):
        return []

    def tok_part(self, j, p):
        return []

    def acc_part(self, i, j, p):
        return []

    def acc_final(self, i, j):
        return []


class Q4_0(Spec):
    prefetch_short = True   # q4_0/q4_1/q5_0/q5_1 (not q8_0, whose Q8_0 subclass turns it off again)
    name, layout, block_bytes, step_bytes = "q4_0", "nib", 18, 72
    consts = {"M4": "splat_i(0x0F0F0F0F)"}
    # repacked group: [qs of 4 blocks: 64][d x4: 8]
    repack = [(b, 2 + j) for b in range(4) for j in range(16)] + [(b, k) for b in range(4) for k in range(2)]
    # the quants' offset -8 times the block sum (stored negated) over the 4 lanes of a block: -sum << 1 in each
    bias_shift = 1

    def row_part(self, i, p):
        return [f"w{i} = load_i(W, wb{i})", f"lo{i} = vand(w{i}, M4)", f"hi{i} = vand(vshr(w{i}, 4), M4)",
                f"dw{i} = load_h4_bcast4(W, wb{i} + 64)"]

    def tok_part(self, j, p):
        return [f"xl{j} = load_i(XQ, xq{j})", f"xh{j} = load_i(XQ, xq{j} + 64)", f"dx{j} = load_f4_bcast4(XD, xd{j})",
                f"xc{j} = vshl(load_i4_bcast4(XS, xs{j}), {self.bias_shift})"]

    def acc_part(self, i, j, p):
        return [f"acc{i}_{j} = fma(cvt(dpbusd(dpbusd(xc{j}, lo{i}, xl{j}), hi{i}, xh{j})), fmul(dw{i}, dx{j}), "
                f"acc{i}_{j})"]


class Q4_1(Q4_0):
    name, block_bytes, step_bytes = "q4_1", 20, 80
    consts = {"M4": "splat_i(0x0F0F0F0F)", "Z": "splat_i(0)"}
    repack = ([(b, 4 + j) for b in range(4) for j in range(16)] + [(b, k) for b in range(4) for k in range(2)]
              + [(b, 2 + k) for b in range(4) for k in range(2)])

    def row_part(self, i, p):
        return super().row_part(i, p) + [f"mw{i} = load_h4_bcast4(W, wb{i} + 72)"]

    def tok_part(self, j, p):
        return [f"xl{j} = load_i(XQ, xq{j})", f"xh{j} = load_i(XQ, xq{j} + 64)", f"dx{j} = load_f4_bcast4(XD, xd{j})",
                f"xsf{j} = load_f4_bcast4(XF, xs{j})"]

    def acc_part(self, i, j, p):
        return [f"acc{i}_{j} = fma(cvt(dpbusd(dpbusd(Z, lo{i}, xl{j}), hi{i}, xh{j})), fmul(dw{i}, dx{j}), "
                f"fma(mw{i}, xsf{j}, acc{i}_{j}))"]


class Q5_0(Q4_0):
    name, block_bytes, step_bytes = "q5_0", 22, 88
    bias_shift = 2      # -16 = 4 lanes x -4
    # [qs 64][low 16 bits of the 4 qh words: 8][high 16 bits: 8][d x4: 8]
    repack = ([(b, 6 + j) for b in range(4) for j in range(16)] + [(b, 2 + k) for b in range(4) for k in range(2)]
              + [(b, 4 + k) for b in range(4) for k in range(2)] + [(b, k) for b in range(4) for k in range(2)])
    d_off = 80

    def row_part(self, i, p):
        return [f"w{i} = load_i(W, wb{i})",
                f"lo{i} = add_mask64(vand(w{i}, M4), W, wb{i} + 64, 16)",
                f"hi{i} = add_mask64(vand(vshr(w{i}, 4), M4), W, wb{i} + 72, 16)",
                f"dw{i} = load_h4_bcast4(W, wb{i} + {self.d_off})"]


class Q5_1(Q4_1):
    name, block_bytes, step_bytes = "q5_1", 24, 96
    repack = ([(b, 8 + j) for b in range(4) for j in range(16)] + [(b, 4 + k) for b in range(4) for k in range(2)]
              + [(b, 6 + k) for b in range(4) for k in range(2)] + [(b, k) for b in range(4) for k in range(2)]
              + [(b, 2 + k) for b in range(4) for k in range(2)])

    def row_part(self, i, p):
        return [f"w{i} = load_i(W, wb{i})",
                f"lo{i} = add_mask64(vand(w{i}, M4), W, wb{i} + 64, 16)",
                f"hi{i} = add_mask64(vand(vshr(w{i}, 4), M4), W, wb{i} + 72, 16)",
                f"dw{i} = load_h4_bcast4(W, wb{i} + 80)", f"mw{i} = load_h4_bcast4(W, wb{i} + 88)"]


class Q8_0(Q4_0):
    """Repacked so that the first 64 bytes of a group hold bytes 0..15 of its 4 blocks and the second 64 bytes bytes
    16..31: both loads then meet the nibble-order activations, and i32 lanes 4b..4b+3 of both products belong to block
    b, so one conversion and one FMA per group serve both halves (as for q4_0)."""
    name, block_bytes, step_bytes = "q8_0", 34, 136
    prefetch_short = False
    repack = ([(b, 2 + j) for b in range(4) for j in range(16)] + [(b, 18 + j) for b in range(4) for j in range(16)]
              + [(b, k) for b in range(4) for k in range(2)])
    vnni = ISA == "avx512vnni"
    # VNNI: w + 128 as unsigned bytes (xor 0x80), and -128 * sum(x) per block as the accumulator start.
    # AVX2: |w| * sign(w)x (vpmaddubsw would saturate on w + 128).
    consts = ({"M80": f"splat_i({simd.bytes4(0x80)})"} if vnni else {"Z": "splat_i(0)"})

    def row_part(self, i, p):
        if self.vnni:
            w = [f"u0{i} = vxor(load_i(W, wb{i}), M80)", f"u1{i} = vxor(load_i(W, wb{i} + 64), M80)"]
        else:
            w = [f"u0{i} = load_i(W, wb{i})", f"u1{i} = load_i(W, wb{i} + 64)"]
        return w + [f"dw{i} = load_h4_bcast4(W, wb{i} + 128)"]

    def tok_part(self, j, p):
        t = [f"xl{j} = load_i(XQ, xq{j})", f"xh{j} = load_i(XQ, xq{j} + 64)", f"dx{j} = load_f4_bcast4(XD, xd{j})"]
        if self.vnni:
            t.append(f"xc{j} = vshl(load_i4_bcast4(XS, xs{j}), 5)")     # -128 = 4 lanes x -32
        return t

    def acc_part(self, i, j, p):
        if self.vnni:
            dot = f"dpbusd(dpbusd(xc{j}, u0{i}, xl{j}), u1{i}, xh{j})"
        else:
            dot = f"dot_s8s8(dot_s8s8(Z, u0{i}, xl{j}), u1{i}, xh{j})"
        return [f"acc{i}_{j} = fma(cvt({dot}), fmul(dw{i}, dx{j}), acc{i}_{j})"]


class KSpec(Spec):
    block_w = step_w = xq_step = 256
    xd_step = 1
    xs_step = 16
    parts = 4
    tile_r = 2

    def tok_setup(self, j):
        return [f"dx{j} = XD[xd{j}]", f"xb{j} = load_i(XS, xs{j})"]

    def tok_part(self, j, p):
        return [f"x{j}_{p} = load_i(XQ, xq{j} + {64 * p})"]

    def acc_part(self, i, j, p):
        prev = "Z" if p == 0 else f"is{i}_{j}"
        return [f"is{i}_{j} = dpwssd({prev}, maddubs(n{i}_{p}, x{j}_{p}), s{i}_{p})"]


# q6_K word scales (simd.make_s8_words) for packs(P_2h, P_2h+1): i32 lanes 4c..4c+3 of part p belong to the 16-weight
# sub-block 4p + c
_S6_WORDS = {f"SW{h}": [4 * (2 * h + w // 4) + c for c in range(4) for w in range(8)] for h in range(2)}
# q2_K's 2-bit fields: part p = bits 2p, 2p+1 of every packed byte (simd.make_bitfield: one vgf2p8affineqb with
# GFNI instead of a shift and a mask; +2-6 % per core, same-process A/B; on q4_K's nibbles it measured nothing, the
# instruction shares the VNNI pipes there)
_BITFIELDS = {**{f"BF{2 * p}": (2 * p, 2) for p in range(4)},
              # Q3_K's 3-bit fields: n1 (X bits 3..5), n2's low bits (X bits 6, 7), n2's bit 2 and n3 from Y
              "BF33": (3, 3), "BF62": (6, 2), "YH2": (0, 1, 2, 1), "Y3": (2, 3, 0, 5)}


class Q6_K(KSpec):
    name, layout, block_bytes, step_bytes = "q6_K", "k_nat", 210, 210
    consts = {"M4": "splat_i(0x0F0F0F0F)", "M30": f"splat_i({simd.bytes4(0x30)})", "Z": "splat_i(0)",
              "SHL": "halves_i(4, 2)", "SHR": "halves_i(0, 2)", "MW": "splat_i(0xFFFF)"}

    def row_setup(self, i):
        # scl: the scales as the low word of each i32 lane, for the -32 offset against the block sums in acc_final
        return [f"scl{i} = vand(load_i8x16(W, wb{i} + 192), MW)", f"d{i} = load_h1(W, wb{i} + 208)"]

    def row_part(self, i, p):
        h = p // 2
        lines = []
        if p % 2 == 0:
            lines += [f"L{i}_{h} = load_i(W, wb{i} + {64 * h})", f"H{i}_{h} = load_i_dup256(W, wb{i} + {128 + 32 * h})",
                      f"n{i}_{p} = vor(vand(L{i}_{h}, M4), vand(vshlv(H{i}_{h}, SHL), M30))"]
        else:
            lines += [f"n{i}_{p} = vor(vand(vshr(L{i}_{h}, 4), M4), vand(vshrv(H{i}_{h}, SHR), M30))"]
        return lines + ([f"s{i}_{h} = SW{h}(W, wb{i} + 192)"] if p % 2 == 0 else [])

    def acc_part(self, i, j, p):
        # one vpdpbusd per part (a sum of 4 products of 6-bit quants fits 16 bits: <= 4 * 63 * 128; 16, as Q4_K's
        # one accumulator over the parts would need, do not), two parts packed to words and scaled with one vpdpwssd
        lines = [f"P{i}_{j}_{p} = dpbusd(Z, n{i}_{p}, x{j}_{p})"]
        if p % 2:
            prev = "Z" if p == 1 else f"is{i}_{j}"
            lines.append(f"is{i}_{j} = dpwssd({prev}, packs(P{i}_{j}_{p - 1}, P{i}_{j}_{p}), s{i}_{p // 2})")
        return lines

    def acc_final(self, i, j):
        return [f"acc{i}_{j} = fma(cvt(vsub(is{i}_{j}, vshl(dpwssd(Z, scl{i}, xb{j}), 5))), splat_f(d{i} * dx{j}), "
                f"acc{i}_{j})"]


class _K2(KSpec):
    """q2_K and q3_K (`repack_k2`; q4_K and q5_K by `repack_k4`), repacked once at load so that i32 lane k of every
    64-byte part belongs to the 16-weight sub-block k (byte 4k + b of part p = weight 16k + 4p + b; the activations
    follow, q8.PERM_SUB). The four parts' vpdpbusd then run into one accumulator whose lanes are whole sub-block sums,
    scaled by one vpdpwssd against the scales as the low words of the lanes (a sub-block sum fits in 16 bits). The
    file's order has every part on other sub-blocks: there each pair of parts took a vpackssdw, a scale-word shuffle
    and a vpdpwssd. q3_K per core from L3 17.3 -> 25.8 GB/s, q2_K 17.3 -> 19.5 (same-process A/B)."""
    layout, parts = "k_sub", 4
    prefetch_short = True   # repacked (anonymous memory): q2_K 2 threads from DRAM 32.7 -> 36.4 GB/s with it

    def acc_part(self, i, j, p):
        return [f"A{i}_{j} = dpbusd({self.acc_start(j) if p == 0 else f'A{i}_{j}'}, n{i}_{p}, x{j}_{p})"]

    def acc_start(self, j):
        return "Z"

    def with_mins(self, i, j, isum, mins):
        """acc += cvt(isum) * d * dx + mins * dmin * XF: the min term (q2_K, q4_K, q5_K) in float against XF = -dx *
        the 16-element sums (q8.quantize_q8_K), lane k's min in `mins`: one conversion of the row's mins and two
        float ops instead of a vpdpwssd, its conversion and the scalar dm * dx (+5-7 % per core from L3, q2_K)."""
        return [f"acc{i}_{j} = fma(cvt({isum}), splat_f(d{i} * dx{j}), "
                f"fma(fmul({mins}, splat_f(dm{i})), load_f(XF, xs{j}), acc{i}_{j}))"]


class Q3_K(_K2):
    """110-byte blocks [scales 6][d 2][scales 6][X 64][Y 32] (AVX-512 VBMI; `Q3_K_I8` otherwise). With n_p = the 3-bit
    quant of part p (low 2 bits + 4 * high bit, 0..7; the value is n - 4) at byte m of the `_K2` order: X[m] = n0 |
    n1 << 3 | (n2 & 3) << 6; Y[m] (m < 32) = n2(m) >> 2 | (n2(32 + m) >> 2) << 1 | n3(m) << 2 | n3(32 + m) << 5.
    Each part is then one or two bit-field ops (Y read into both 256-bit halves, each half taking its own bits): 6
    vector ops per super-block for the quants, where the file's 2-bit fields plus high-bit mask took 13 (4 fields, 4
    vptestmb, 4 masked adds, one more for part 0); per core from L3 24.2-24.7 -> 28.7-30.1 GB/s. The 16 scales
    (minus 32, as 6-bit two's complement) are re-packed at load so that one `vpmultishiftqb` and one `vpsraw` give
    the `vpdpwssd` operand (simd.load_q3k_scales): the file's size, where the int8 scales of `Q3_K_I8` stream 114
    bytes per super-block (65B layer from DRAM, same process: 2 threads 26.3 -> 28.3 GB/s, 1 thread 21.5 -> 22.7;
    from L3 alike). The quants' -4 offset enters as the accumulator's start, the activation block sums times -4."""
    name, block_bytes, step_bytes = "q3_K", 110, 110
    consts = {"Z": "splat_i(0)", "M7": f"splat_i({simd.bytes4(7)})"}
    packed_scales = True
    x_off, y_off, d_off = 14, 78, 6

    def repack_rows(self, raw2d, n_blk):
        return repack_k2(raw2d, n_blk, True, self.packed_scales)

    def scales(self, i):
        return f"scl{i} = load_q3k_scales(W, wb{i})"

    def row_setup(self, i):
        return [self.scales(i), f"X{i} = load_i(W, wb{i} + {self.x_off})",
                f"Y{i} = load_i_dup256(W, wb{i} + {self.y_off})", f"d{i} = load_h1(W, wb{i} + {self.d_off})"]

    def row_part(self, i, p):
        return [[f"n{i}_0 = vand(X{i}, M7)", f"n{i}_1 = BF33(X{i})", f"n{i}_2 = vor(BF62(X{i}), YH2(Y{i}))",
                 f"n{i}_3 = Y3(Y{i})"][p]]

    def acc_start(self, j):
        return f"xb{j}"     # sum((q + 4) x) - 4 sum(x): |result| <= 16 * 4 * 127 still fits 16 bits

    def acc_final(self, i, j):
        return [f"acc{i}_{j} = fma(cvt(dpwssd(Z, A{i}_{j}, scl{i})), splat_f(d{i} * dx{j}), acc{i}_{j})"]


class Q3_K_I8(Q3_K):
    """q3_K without VBMI (AVX2, or AVX-512 before Ice Lake): 114-byte blocks [X 64][Y 32][16 scales as int8, minus
    32][d 2], the scales sign-extended by one `vpmovsxbd` and masked to the low words."""
    step_bytes = 114
    consts = dict(Q3_K.consts, MW="splat_i(0xFFFF)")
    packed_scales = False
    x_off, y_off, d_off = 0, 64, 112

    def scales(self, i):
        return f"scl{i} = vand(load_i8x16(W, wb{i} + 96), MW)"


class Q2_K(_K2):
    name, block_bytes, step_bytes = "q2_K", 84, 84
    consts = {"Z": "splat_i(0)", "M15": "splat_i(15)"}

    def repack_rows(self, raw2d, n_blk):
        return repack_k2(raw2d, n_blk, False, False)

    def row_setup(self, i):
        return [f"u{i} = load_u8x16(W, wb{i})", f"sc{i} = vand(u{i}, M15)", f"mn{i} = vshr(u{i}, 4)",
                f"Q{i} = load_i(W, wb{i} + 16)",
                f"d{i} = load_h1(W, wb{i} + 80)", f"dm{i} = load_h1(W, wb{i} + 82)"]

    def row_part(self, i, p):
        return [f"n{i}_{p} = BF{2 * p}(Q{i})"]

    def acc_final(self, i, j):
        return self.with_mins(i, j, f"dpwssd(Z, A{i}_{j}, sc{i})", f"cvt(mn{i})")


class Q4_K(_K2):
    """q4_K repacked at load (`repack_k4`, same 144 bytes) into the `_K2` lane order: all four parts' vpdpbusd run
    into one accumulator whose lane k holds 16 products of the 32-weight sub-block k // 2 (<= 16 * 15 * 127, fits a
    word), scaled by one vpdpwssd against the scales spread to the lanes (one vpermd), where the file's order took a
    vpackssdw per pair of parts, two vpdpwssd and two word-scale builds. Same process, file order -> this: a
    128-token mat-mat 1.44-1.48x faster (4096 x 4096: 20.4 -> 13.9 ms, 2 threads), the mat-vec from L3 +7-8 %, from
    DRAM at the low bandwidth level equal; the repack runs at ~5-8 GB/s. The 6-bit scales/mins stay packed (a
    16-byte unpacked copy measured as fast from L3 and slower from DRAM)."""
    name, block_bytes, step_bytes = "q4_K", 144, 144
    consts = {"Z": "splat_i(0)", "M4": "splat_i(0x0F0F0F0F)"}
    qs_off = 16

    def repack_rows(self, raw2d, n_blk):
        return repack_k4(raw2d, n_blk, False)

    def row_setup(self, i):
        return [f"scm{i} = q4k_scales(W, wb{i} + 4)", f"sc{i} = K4SC(scm{i})", f"mn{i} = cvt(K4MN(scm{i}))",
                f"d{i} = load_h1(W, wb{i})", f"dm{i} = load_h1(W, wb{i} + 2)"]

    def nibbles(self, i, p):
        c, o = p // 2, self.qs_off + 64 * (p // 2)
        if p % 2 == 0:
            return [f"w{i}_{c} = load_i(W, wb{i} + {o})", f"n{i}_{p} = vand(w{i}_{c}, M4)"]
        return [f"n{i}_{p} = vand(vshr(w{i}_{c}, 4), M4)"]

    def row_part(self, i, p):
        return self.nibbles(i, p)

    def acc_final(self, i, j):
        return self.with_mins(i, j, f"dpwssd(Z, A{i}_{j}, sc{i})", f"mn{i}")     # lane k: sub-block k // 2's min


class Q5_K(Q4_K):
    """q5_K likewise (`repack_k4`, 176 bytes; the 32 bytes of high bits re-ordered so that bit p / 4 + p of byte m is
    part p's fifth bit at position m / 32 + m). Five-bit quants: 16 products no longer fit a word, so parts 0-1 and
    2-3 run into two accumulators and take one vpdpwssd each."""
    name, block_bytes, step_bytes = "q5_K", 176, 176
    qs_off = 48
    consts = dict(Q4_K.consts, **{f"HB{p}": f"halves_i({simd.bytes4(1 << p)}, {simd.bytes4(1 << (4 + p))})"
                                   for p in range(4)})

    def repack_rows(self, raw2d, n_blk):
        return repack_k4(raw2d, n_blk, True)

    def row_setup(self, i):
        return super().row_setup(i) + [f"qh{i} = load_i_dup256(W, wb{i} + 16)"]

    def row_part(self, i, p):
        lines = self.nibbles(i, p)
        lines[-1] = lines[-1].replace(f"n{i}_{p} = ", f"n{i}_{p} = add_nz(") + f", vand(qh{i}, HB{p}), 16)"
        return lines

    def acc_part(self, i, j, p):
        a = f"A{i}_{j}" if p < 2 else f"B{i}_{j}"
        return [f"{a} = dpbusd({'Z' if p % 2 == 0 else a}, n{i}_{p}, x{j}_{p})"]

    def acc_final(self, i, j):
        return self.with_mins(i, j, f"dpwssd(dpwssd(Z, A{i}_{j}, sc{i}), B{i}_{j}, sc{i})", f"mn{i}")


class F16(Spec):
    name, layout, block_bytes, block_w = "f16", "f16", 2, 1
    # Activations are rounded to fp16 as llama.cpp does. The mat-vec keeps them as fp16 bytes in XQ (half the
    # traffic, so the row stays in L1); the mat-mat, bound by FMA throughput, takes them widened to f32 so that only
    # the weights need a conversion per step (measured 88-99 -> 102-105 GFLOP/s per core on 7B shapes).
    step_w, step_bytes, xq_step, xd_step, xs_step = 16, 32, 64, 0, 0

    def row_part(self, i, p):
        return [f"wf{i} = load_h16(W, wb{i})"]

    def tok_part(self, j, p):
        return [f"xf{j} = load_f(XQ, xq{j})"]

    def acc_part(self, i, j, p):
        return [f"acc{i}_{j} = fma(wf{i}, xf{j}, acc{i}_{j})"]


SPECS: dict[int, Spec] = {int(t): cls() for t, cls in [
    (GGMLType.Q4_0, Q4_0), (GGMLType.Q4_1, Q4_1), (GGMLType.Q5_0, Q5_0), (GGMLType.Q5_1, Q5_1),
    (GGMLType.Q8_0, Q8_0), (GGMLType.Q2_K, Q2_K), (GGMLType.Q3_K, Q3_K if simd._HAS_VBMI else Q3_K_I8),
    (GGMLType.Q4_K, Q4_K),
    (GGMLType.Q5_K, Q5_K), (GGMLType.Q6_K, Q6_K), (GGMLType.F16, F16)]}


def supported_types() -> list[int]:
    """GGML type ids that have a fast kernel on this CPU (empty without AVX2)."""
    return sorted(SPECS) if ISA != "none" else []


# per k-quant activation layout, the quantize_q8_K arguments (byte order q8.LAYOUT_*, bmul): the k_sub types take the
# block sums times -4 (Q3_K.acc_start); used by _quantize and the generator
_Q8K_ARGS = {"k_nat": (q8.LAYOUT_NATURAL, 1), "k_sub": (q8.LAYOUT_SUB, -4)}
# layouts whose activations carry XF (the Q8_1 s of q4_1/q5_1; the float min terms of q2_K, q4_K, q5_K)
_WITH_XF = ("nib", "k_sub")


# =============================================================================================== code generator
# the generated module is imported from a file outside the package, so it names the package absolutely
_PKG = __name__.rpartition(".")[0]
_HEADER = '''# Generated by {pkg}.fast for ISA {isa} -- do not edit (regenerated when the generator changes).
import numba
import numpy as np
from numba import prange
from {pkg} import JIT, JIT_PARALLEL
from {pkg}.q8 import f16_bytes, quantize_q8_0_nibble, quantize_q8_K
from {pkg}.simd import *  # noqa
from {pkg}.simd import make_s8_words, make_bitfield, make_lanes
'''


def _emit_tile(spec: Spec, R: int, T: int, ind: str, n_tok_check: bool, prefetch: bool = False) -> list[str]:
    """The body computing one R-rows x T-tokens tile starting at row `r`, token `t0`. With R > 1, rows past the
    chunk end `r1` re-read the chunk's last row and are not stored (one body instead of a remainder loop: half the
    compile time). `prefetch`: the mat-vec, which streams W once from DRAM (the mat-mat re-reads each row tile
    from L2 for every token tile and is bound by arithmetic)."""
    L = []
    if R > 1:
        L += [f"ri{i} = min(r + {i}, r1 - 1)" for i in range(R)]
    for i in range(R):
        for j in range(T):
            L.append(f"acc{i}_{j} = splat_f(0.0)")
    L.append("for s in range(n_steps):")
    b = []
    for i in range(R):
        b.append(f"wb{i} = {f'ri{i}' if R > 1 else 'r'} * RB + s * {spec.step_bytes}")
        if prefetch:     # one prefetch per 64 bytes of step keeps every line of the stream covered
            b.append("if pf:")
            b += [f"    prefetch_l2(W, wb{i} + {PF_DIST + 64 * k})" for k in range(-(-spec.step_bytes // 64))]
    for j in range(T):
        b.append(f"xq{j} = (t0 + {j}) * XQS + s * {spec.xq_step}")
        b.append(f"xd{j} = (t0 + {j}) * XDS + s * {spec.xd_step}")
        b.append(f"xs{j} = (t0 + {j}) * XSS + s * {spec.xs_step}")
    for i in range(R):
        b += spec.row_setup(i)
    for j in range(T):
        b += spec.tok_setup(j)
    for p in range(spec.parts):
        for i in range(R):
            b += spec.row_part(i, p)
        for j in range(T):
            b += spec.tok_part(j, p)
            for i in range(R):
                b += spec.acc_part(i, j, p)
    for i in range(R):
        for j in range(T):
            b += spec.acc_final(i, j)
    L += ["    " + x for x in b]
    for j in range(T):
        st = []
        for i in range(R):
            if R > 1 and i > 0:
                st.append(f"if r + {i} < r1:")
                st.append(f"    out[(t0 + {j}) * n_rows + r + {i}] = hsum_f(acc{i}_{j})")
            else:
                st.append(f"out[(t0 + {j}) * n_rows + r + {i}] = hsum_f(acc{i}_{j})")
        if n_tok_check:
            L.append(f"if t0 + {j} < n_tok:")
            L += ["    " + x for x in st]
        else:
            L += st
    return [ind + x for x in L]


def _emit_consts(spec: Spec, ind: str) -> list[str]:
    return [f"{ind}{k} = {v}" for k, v in spec.consts.items()]


def generate_source(spec: Spec) -> str:
    """Python source of the module holding `matvec` and `matmat` for one weight type."""
    src = [_HEADER.format(isa=ISA, pkg=_PKG)]
    for name, mask in _S6_WORDS.items():
        src.append(f"{name} = make_s8_words({mask})")
    for name, args in _BITFIELDS.items():
        src.append(f"{name} = make_bitfield{args}")
    src.append(f"K4SC = make_lanes({[k // 2 for k in range(16)]})")         # lane k <- scale of sub-block k // 2
    src.append(f"K4MN = make_lanes({[8 + k // 2 for k in range(16)]})")     # lane k <- its min
    src.append("")
    # --- one token's activations: one int8 buffer A = [XQ | XD f32 | XS i32 | XF f32] (offsets: act1_offsets)
    views = ["    XQ = A[:oD]", "    XD = A[oD:oS].view(np.float32)", "    XS = A[oS:oF].view(np.int32)",
             "    XF = A[oF:oE].view(np.float32)"]
    src.append("@numba.jit(**JIT)")
    src.append("def fill1(x, A, oD, oS, oF, oE):")
    src += views
    if spec.layout == "f16":
        src.append("    f16_bytes(x, XQ)")
    elif spec.layout == "nib":
        src.append("    quantize_q8_0_nibble(x, XQ, XD, XS, XF)")
    else:
        layout, bmul = _Q8K_ARGS[spec.layout]
        src.append(f"    quantize_q8_K(x, {layout}, {bmul}, XQ, XD, XS, XF)")
    src.append("")
    # --- quantize1: A allocated on a 64-byte line (see empty_lines) and filled, in one call from Python
    # (FastWeight.quantize_input); matvec_x: that and the mat-vec in one call (FastWeight.matvec)
    src.append("@numba.jit(**JIT)")
    src.append("def quantize1(x, oD, oS, oF, oE):")
    src.append("    buf = np.empty(oE + 64, np.int8)")
    src.append("    o = (-buf.ctypes.data) & 63")
    src.append("    A = buf[o:o + oE]")
    src.append("    fill1(x, A, oD, oS, oF, oE)")
    src.append("    return A")
    src.append("")
    src.append("@numba.jit(**JIT)")
    src.append("def matvec_x(W, RB, n_rows, n_steps, x, oD, oS, oF, oE, out, pf):")
    src.append("    A = quantize1(x, oD, oS, oF, oE)")
    src.append("    matvec(W, RB, n_rows, n_steps, A, oD, oS, oF, oE, out, pf)")
    src.append("")
    # --- matvec: one row at a time, one token
    src.append("@numba.jit(**JIT_PARALLEL)")
    src.append("def matvec(W, RB, n_rows, n_steps, A, oD, oS, oF, oE, out, pf):")
    src += views
    src += _emit_consts(spec, "    ")
    MR = spec.mv_rows
    src += ["    XQS = 0", "    XDS = 0", "    XSS = 0", "    t0 = 0",
            f"    n_chunks = (n_rows + {CHUNK - 1}) // {CHUNK}",
            "    for c in prange(n_chunks):",
            f"        r1 = min(c * {CHUNK} + {CHUNK}, n_rows)",
            f"        for r in range(c * {CHUNK}, r1, {MR}):"]
    if isinstance(spec, F16):
        src += _emit_f16_matvec("            ")
    else:
        src += _emit_tile(spec, MR, 1, "            ", False, prefetch=True)
    src.append("")
    # --- matmat: R x T register tiles; leftover rows of a chunk one at a time
    R = spec.tile_r
    src.append("@numba.jit(**JIT_PARALLEL)")
    src.append("def matmat(W, RB, n_rows, n_steps, XQ, XQS, XD, XDS, XS, XF, XSS, out, n_tok, n_tok_pad):")
    src += _emit_consts(spec, "    ")
    src += [f"    n_chunks = (n_rows + {CHUNK - 1}) // {CHUNK}",
            "    for c in prange(n_chunks):",
            f"        r0 = c * {CHUNK}",
            f"        r1 = min(r0 + {CHUNK}, n_rows)",
            f"        for t0 in range(0, n_tok_pad, {spec.tile_t}):",
            "            r = r0",
            "            while r < r1:"]
    src += _emit_tile(spec, R, spec.tile_t, "                ", True)
    src += [f"                r += {R}", ""]
    return "\n".join(src) + "\n"


def _emit_f16_matvec(ind: str) -> list[str]:
    # 4 independent accumulators (64 weights per iteration) so the FMA latency does not bound the loop.
    L = [f"a{k} = splat_f(0.0)" for k in range(4)]
    L.append("for s in range(0, n_steps, 4):")
    L.append("    if pf:")
    L.append(f"        prefetch_l2(W, r * RB + s * 32 + {PF_DIST})")
    L.append(f"        prefetch_l2(W, r * RB + s * 32 + {PF_DIST + 64})")
    for k in range(4):
        L.append(f"    a{k} = fma(load_h16(W, r * RB + (s + {k}) * 32), load_h16(XQ, (s + {k}) * 32), a{k})")
    L.append("out[r] = hsum_f(fadd(fadd(a0, a1), fadd(a2, a3)))")
    return [ind + x for x in L]


def _source_hash() -> str:
    h = hashlib.sha256()
    for mod in (simd, q8, sys.modules[__name__]):
        h.update(Path(mod.__file__).read_bytes())
    h.update(numba.__version__.encode())
    return h.hexdigest()[:16]


_MODULES: dict[str, object] = {}


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return          # keep the mtime: Numba's cache is invalidated by it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def kernel_module(spec: Spec):
    """Import (generating first if needed) the kernel module of one type for this ISA."""
    key = type(spec).__name__.lower()      # q3_k and q3_k_i8 are two modules of one type
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    text = generate_source(spec)
    tag = f"{ISA}-{_source_hash()}"
    path = None
    for root in (source_dir(), Path(tempfile.gettempdir()) / f"airobackend-{os.getuid()}" / "kernels"):
        try:
            path = root / tag / f"fast_{key}.py"
            _write_if_changed(path, text)
            break
        except OSError:
            path = None
    if path is None:
        raise OSError("cannot write the generated kernel source anywhere")
    modname = f"airobackend_fastgen_{ISA}_{key}"
    ispec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(ispec)
    sys.modules[modname] = mod
    ispec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod


# =============================================================================================== repacking
@numba.jit(**dict(q8.JITQ, parallel=True))
def _repack(raw, n_blk, block_bytes, src_blk, src_off, out):
    """out[r, 4g-group bytes] from raw[r] blocks via the per-group byte map (src_blk, src_off); missing blocks 0."""
    gb = src_blk.shape[0]
    for r in numba.prange(raw.shape[0]):
        for g in range(out.shape[1] // gb):
            for k in range(gb):
                b = 4 * g + src_blk[k]
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


def repack_legacy(spec: Spec, raw2d: np.ndarray, n_blk: int) -> np.ndarray:
    n_grp = (n_blk + 3) // 4
    src_blk = np.array([b for b, _ in spec.repack], dtype=np.int64)
    src_off = np.array([o for _, o in spec.repack], dtype=np.int64)
    assert len(spec.repack) == spec.step_bytes
    out = np.empty((raw2d.shape[0], n_grp * spec.step_bytes), dtype=np.uint8)
    _repack(raw2d, n_blk, spec.block_bytes, src_blk, src_off, out)
    return out


# =============================================================================================== the weight object
_NO_I32 = np.zeros(16, np.int32)
_NO_F32 = np.zeros(16, np.float32)


def _mapping_of(a) -> mmap.mmap | None:
    """The mmap (the model file's mapping) an array's memory lies in, following .base / memoryview.obj; or None."""
    for _ in range(16):
        if isinstance(a, mmap.mmap):
            return a
        nxt = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
        if nxt is None:
            return None
        a = nxt
    return None


def _file_backed(a) -> bool:
    return _mapping_of(a) is not None


def _release_pages(a: np.ndarray) -> None:
    """Drop the whole pages of a contiguous array that lies in a read-only file mapping from this process's page
    tables (MADV_DONTNEED; the file stays in the page cache). After a repack nothing reads them, and without this
    the process kept both the copy and the file pages resident: a q4_0 7B slice file of 637 MB loaded to 1156 MB RSS.
    A hint only: pages that something reads again simply fault back in."""
    mm = _mapping_of(a)
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


def empty_lines(shape, dtype, zero: bool = False) -> np.ndarray:
    """np.empty (or zeros) starting on a 64-byte line. The kernels read activations 64 bytes at a time; from a
    buffer 16 or 48 bytes off a line every such load splits over two lines: mat-vec per core from L3, 1 thread,
    16-byte offset -> aligned: q2_K 15.3 -> 18.3 GB/s, q3_K 18.9 -> 22.0, q4_0 22.3 -> 25.5, q4_K 22.1 -> 24.0
    (numpy and Numba allocate on 16 bytes)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = (np.zeros if zero else np.empty)(n + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    return buf[o:o + n].view(dtype).reshape(shape)


def act1_offsets(spec: Spec, n_steps: int) -> tuple[int, int, int, int]:
    """Byte offsets (oD, oS, oF, oE) of XD, XS, XF and the end in the one-token activation buffer A = [XQ | XD f32 |
    XS i32 | XF f32], each region starting on a 64-byte line. One buffer, quantized and read inside Numba, instead of
    four numpy arrays made in Python per mat-vec: between two weight streams every Python object is out of cache,
    and the four allocations, their views and a second dispatch took 50-80 us per call there (a 65B layer's seven
    q3_K mat-vecs, 2 threads: 0.57 ms of a 13.4 ms token)."""
    def line(n: int) -> int:
        return -(-n // 64) * 64
    lay = spec.layout
    if lay == "f16":
        oD = n_steps * 32
        return oD, oD, oD, oD
    nq, nd, ns = n_steps * spec.xq_step, n_steps * spec.xd_step, n_steps * spec.xs_step
    nf = ns if lay in _WITH_XF else 0
    oD = line(nq)
    oS = oD + line(4 * nd)
    oF = oS + line(4 * ns)
    return oD, oS, oF, oF + 4 * nf


# bytes of quantized activation per weight column read by the mat-vec (XQ + XD + XS [+ XF])
_ACT_BYTES = {"f16": 2.0, "nib": 176 / 128, "k_nat": 324 / 256, "k_sub": 324 / 256}
PF_MIN_ACT = 14 * 1024


class FastWeight:
    """One weight matrix prepared for the fast kernels (see module doc). Thread-safe: no shared scratch."""

    def __init__(self, spec: Spec, W: np.ndarray, row_bytes: int, n_rows: int, n_cols: int, n_steps: int):
        self.spec, self.n_rows, self.n_cols, self.n_steps = spec, n_rows, n_cols, n_steps
        self.ggml_type = next(t for t, s in SPECS.items() if s.name == spec.name)
        self.row_bytes = row_bytes
        self.name = f"fast-{spec.name}-{ISA}"
        self.W = W.reshape(-1)
        if self.W.flags.writeable:
            self.W = self.W.view()
            self.W.flags.writeable = False
        self.nbytes = self.W.nbytes
        mod = kernel_module(spec)
        self._mv, self._mm = mod.matvec, mod.matmat
        # weights with equal act_key read the same quantized activations (all legacy types share the nibble
        # layout with Q8_0 and Q8_1 fields; k-quants differ by byte permutation; F16 reads fp16 bytes)
        self.act_key = (spec.layout, n_cols)
        # Software prefetch where the hardware prefetcher loses the weight stream: (1) once the activation row stops
        # fitting L1 beside it (measured cliff between 15 and 21 KB of activations; 65B ffn_down 9 -> 25 GB/s per
        # core); (2) for weights read in place from the model file's mapping, whatever its page size: with a 4 KB-page
        # page cache, where the hardware prefetchers stop (7B q4_K_M slice from a file, 2 threads: 30-42 -> 51-58
        # tok/s), and with the 2 MB-mapped large folios of Linux 6.18 on ext4 (65B-layer shapes, 2 threads, against
        # a 41-45 GB/s bandwidth sample: q4_K 30.7 -> 37.1 GB/s, F16 28.8 -> 42.0, q6_K 37.2 -> 43.4); (3) for the
        # repacked 4- and 5-bit legacy types (anonymous huge-page memory) at any row length: a 65B layer's seven
        # matrices interleaved, prefetch off for short rows -> on, mean GB/s: q4_0 29.8 -> 31.4 (2 thr), 21.5 -> 23.0
        # (1 thr); q5_0 33.1 -> 33.0, 22.5 -> 23.6; q4_1 +1-2 %, q5_1 +0-3 %; but q8_0 34.5 -> 30.9, 20.7 -> 18.9,
        # so not for q8_0 (Spec.prefetch_short).
        self._pf = n_cols * _ACT_BYTES[spec.layout] > PF_MIN_ACT or _file_backed(W) or spec.prefetch_short
        self._a1 = act1_offsets(spec, n_steps)
        self._mvx, self._q1 = mod.matvec_x, mod.quantize1

    # activation buffers for the mat-mat, n tokens padded to n_pad (a multiple of tile_t): (XQ, XD, XS, XF) 2-D,
    # zero-padded rows beyond the real tokens
    def _quantize(self, X: np.ndarray, n_pad: int):
        spec, n = self.spec, X.shape[0]
        lay = spec.layout
        steps = self.n_steps
        def new(shape, dtype):          # the quantizers write every byte of the real rows; padding rows are 0
            return empty_lines(shape, dtype, zero=n_pad != n)
        if lay == "f16":        # llama.cpp rounds activations to fp16 for F16 weights (see F16 for the layouts)
            XQ = new((n_pad, steps * 64), np.int8)
            q8.f16_round_rows(X.reshape(-1), XQ.reshape(-1).view(np.float32))
            return XQ, steps * 64, _NO_F32, 0, _NO_I32, _NO_F32, 0
        if lay == "nib":
            XQ = new((n_pad, steps * 128), np.int8)
            XD = new((n_pad, steps * 4), np.float32)
            XS = new((n_pad, steps * 4), np.int32)
            XF = new((n_pad, steps * 4), np.float32)
            if n == 1:
                q8.quantize_q8_0_nibble(X[0], XQ[0], XD[0], XS[0], XF[0])
            else:
                q8.quantize_q8_0_nibble_rows(X, XQ[:n], XD[:n], XS[:n], XF[:n])
            return XQ, steps * 128, XD, steps * 4, XS, XF.reshape(-1), steps * 4
        layout, bmul = _Q8K_ARGS[lay]
        XQ = new((n_pad, steps * 256), np.int8)
        XD = new((n_pad, steps), np.float32)
        XS = new((n_pad, steps * 16), np.int32)
        with_f = lay in _WITH_XF
        XF = new((n_pad, steps * 16 if with_f else 0), np.float32)
        if n == 1:
            q8.quantize_q8_K(X[0], layout, bmul, XQ[0], XD[0], XS[0], XF[0])
        else:
            q8.quantize_q8_K_rows(X, layout, bmul, XQ[:n], XD[:n], XS[:n], XF[:n])
        return XQ, steps * 256, XD, steps, XS, (XF.reshape(-1) if with_f else _NO_F32), steps * 16

    def quantize_input(self, X: np.ndarray) -> tuple:
        """Quantize activations X f32[n_tok, n_cols] (or f32[n_cols]) once for `matvec_q` / `matmat_q`.

        The handle may be passed to any FastWeight with the same `act_key` (same activation layout and row length):
        the weights that read one input (wq/wk/wv, w1/w3) then share one quantization."""
        if X.dtype != np.float32 or not X.flags.c_contiguous:
            X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_cols:
            raise ValueError(f"quantize_input: X{list(X.shape)} does not fit a {self.n_rows}x{self.n_cols} weight")
        if X.shape[0] == 1:     # one Numba call that allocates, aligns and fills the buffer (see act1_offsets)
            return (self.act_key, 1, 1, self._q1(X[0], *self._a1))
        n_tok = X.shape[0]
        return self._handle(X, -(-n_tok // self.spec.tile_t) * self.spec.tile_t)

    def _handle(self, X: np.ndarray, n_pad: int) -> tuple:
        # flat views made here once, not per kernel call (Numba's dispatch cost grows with every argument to check)
        XQ, XQS, XD, XDS, XS, XF, XSS = self._quantize(X, n_pad)
        return (self.act_key, X.shape[0], n_pad, XQ.reshape(-1), XQS, XD.reshape(-1), XDS, XS.reshape(-1), XF, XSS)

    def _check_handle(self, xq: tuple) -> None:
        if xq[0] != self.act_key:
            raise ValueError(f"activations quantized as {xq[0]} cannot feed a {self.name} weight ({self.act_key})")

    def matvec_q(self, xq: tuple, out: np.ndarray) -> np.ndarray:
        """`matvec` on activations already quantized by `quantize_input` (one token). out: f32[n_rows]."""
        self._check_handle(xq)
        if xq[1] != 1 or out.shape != (self.n_rows,):
            raise ValueError(f"matvec_q: {xq[1]} tokens / out{list(out.shape)} do not fit a {self.n_rows}-row weight")
        tgt = out if (out.dtype == np.float32 and out.flags.c_contiguous) else np.empty(self.n_rows, np.float32)
        old = numba.set_parallel_chunksize(PAR_CHUNKS)
        try:
            self._mv(self.W, self.row_bytes, self.n_rows, self.n_steps, xq[3], *self._a1, tgt, self._pf)
        finally:
            numba.set_parallel_chunksize(old)
        if tgt is not out:
            out[...] = tgt
        return out

    def matmat_q(self, xq: tuple, out: np.ndarray) -> np.ndarray:
        """`matmat` on activations already quantized by `quantize_input`. out: f32[n_tok, n_rows]."""
        self._check_handle(xq)
        if len(xq) == 4:        # a one-token handle (quantize_input of one row): the mat-vec's layout
            raise ValueError("matmat_q needs activations quantized for more than one token")
        _, n_tok, n_pad, XQ, XQS, XD, XDS, XS, XF, XSS = xq
        if out.shape != (n_tok, self.n_rows):
            raise ValueError(f"matmat_q: out{list(out.shape)} does not fit {n_tok} tokens x {self.n_rows} rows")
        if n_tok == 0:
            return out
        tgt = out if (out.dtype == np.float32 and out.flags.c_contiguous) else np.empty((n_tok, self.n_rows),
                                                                                        np.float32)
        old = numba.set_parallel_chunksize(PAR_CHUNKS)
        try:
            self._mm(self.W, self.row_bytes, self.n_rows, self.n_steps, XQ, XQS, XD, XDS, XS, XF, XSS,
                     tgt.reshape(-1), n_tok, n_pad)
        finally:
            numba.set_parallel_chunksize(old)
        if tgt is not out:
            out[...] = tgt
        return out

    def matvec(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[r] = sum_c W[r, c] * x[c] (x quantized like llama.cpp). x: f32[n_cols]; out: f32[n_rows]."""
        if x.shape != (self.n_cols,) or out.shape != (self.n_rows,):
            raise ValueError(f"matvec: x{list(x.shape)} / out{list(out.shape)} do not fit a "
                             f"{self.n_rows}x{self.n_cols} weight")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, np.float32)
        tgt = out if (out.dtype == np.float32 and out.flags.c_contiguous) else np.empty(self.n_rows, np.float32)
        old = numba.set_parallel_chunksize(PAR_CHUNKS)
        try:        # quantization and product in one call (see act1_offsets)
            self._mvx(self.W, self.row_bytes, self.n_rows, self.n_steps, x, *self._a1, tgt, self._pf)
        finally:
            numba.set_parallel_chunksize(old)
        if tgt is not out:
            out[...] = tgt
        return out

    def matmat(self, X: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[t, r] = sum_c W[r, c] * X[t, c]. X: f32[n_tok, n_cols]; out: f32[n_tok, n_rows]."""
        if X.ndim != 2 or X.shape[1] != self.n_cols or out.shape != (X.shape[0], self.n_rows):
            raise ValueError(f"matmat: X{list(X.shape)} / out{list(out.shape)} do not fit a "
                             f"{self.n_rows}x{self.n_cols} weight")
        if X.shape[0] == 0:
            return out
        if X.shape[0] == 1:             # a single token through the mat-mat kernel: pad it to a tile
            return self.matmat_q(self._handle(np.ascontiguousarray(X, np.float32), self.spec.tile_t), out)
        return self.matmat_q(self.quantize_input(X), out)


def prepare_fast(ggml_type, raw2d: np.ndarray, n_rows: int, n_cols: int) -> FastWeight | None:
    """A FastWeight for this tensor, or None when the CPU lacks AVX2 or the type/shape has no fast kernel.

    raw2d: uint8[n_rows, row_bytes], the tensor's blocks as stored in the file (read-only views are fine; q6_K and
    F16 rows are used in place, the other types are copied once into the kernel layout)."""
    if ISA == "none":
        return None
    spec = SPECS.get(int(ggml_type))
    if spec is None or n_rows <= 0 or n_cols <= 0:
        return None
    if n_cols % spec.block_w or (spec.layout == "f16" and n_cols % 64):
        return None
    n_blk = n_cols // spec.block_w
    row_bytes = n_blk * spec.block_bytes
    raw2d = np.asarray(raw2d)
    if raw2d.dtype != np.uint8 or raw2d.shape != (n_rows, row_bytes):
        raise ValueError(f"raw2d must be uint8[{n_rows}, {row_bytes}] for {spec.name}, got "
                         f"{raw2d.dtype}{list(raw2d.shape)}")
    if hasattr(spec, "repack") or hasattr(spec, "repack_rows"):
        W = repack_legacy(spec, raw2d, n_blk) if hasattr(spec, "repack") else spec.repack_rows(raw2d, n_blk)
        _release_pages(raw2d)
        return FastWeight(spec, W, W.shape[1], n_rows, n_cols, W.shape[1] // spec.step_bytes)
    W = np.ascontiguousarray(raw2d)
    return FastWeight(spec, W, row_bytes, n_rows, n_cols, n_cols // spec.step_w)
