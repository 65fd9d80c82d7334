"""The fast kernels' per-type specifications: for each GGML weight type, the code fragments the generator unrolls.

A `Spec` says how one type's kernel reads a step of its weights (128 weights for the legacy types, 256 for the
k-quants, 16 for F16) and meets the quantized activations: which 64-byte loads, which bit-field and dot-product
instructions (kernels/simd.py), which accumulations. The fragments are Python source lines; kernels/codegen.py
assembles them into the mat-vec and mat-mat of each type. Each spec also names its activation layout (the byte order
kernels/q8.py quantizes activations into) and how its file rows become the kernel layout at load (`repack_with`,
done by kernels/repack.py). `SPECS` maps the GGML type ids to the specs this CPU uses.
"""
from __future__ import annotations

from . import q8, simd
from .ggml_types import GGMLType

ISA = simd.ISA
TILE_T = 4          # tokens per register tile in matmat


class Spec:
    """Code fragments of one weight type for the generator.

    Per step (128 weights for legacy types, 256 for k-quants, 16 for F16) the kernel runs `row_setup(i)` for each row
    of the tile, `tok_setup(j)` for each token, then for each part p: `row_part(i, p)`, `tok_part(j, p)` and
    `acc_part(i, j, p)`, and finally `acc_final(i, j)`. Names available: `wb{i}` (byte offset of the step in W),
    `xq{j}`, `xd{j}`, `xs{j}` (offsets of the step in XQ, XD, XS/XF), the constants of `consts`.
    """
    name = ""
    layout = ""         # activation layout: 'nib', 'k_sub', 'f16'
    block_bytes = 0     # file bytes per block (weights per block = `block_w`)
    block_w = 32
    step_w = 128        # weights per kernel step
    step_bytes = 0      # bytes of (possibly repacked) W per step
    xq_step = 128
    xd_step = 4
    xs_step = 4
    parts = 1
    group_blocks = 4    # legacy blocks per kernel step (repack_legacy's groups)
    tile_r = 4
    tile_t = TILE_T
    few_r = 4           # rows per tile of the few-token mat-mat (codegen.FEW_T tokens at most)
    mv_rows = 1         # rows per mat-vec step (2 measured slower from DRAM: one stream per core streams best)
    prefetch_short = False  # prefetch short rows in anonymous memory too (see fast.FastWeight._pf)
    few_prefetch = False    # the few-token mat-mat prefetches whether or not the mat-vec does
    # a tile of several rows prefetches the same step of the next row tile instead of PF_DIST bytes ahead: PF_DIST
    # past a row shorter than it lands in the current tile's next row, only a few steps ahead of its reads
    pf_tile = False
    # matmat_few takes rows whose FEW_T tokens of activations outgrow L1 (codegen.FEW_L1) in column blocks
    few_blocks = False
    # how the file's rows become the kernel layout (kernels/repack.py): None = read in place, else (kind, options)
    repack_with: tuple[str, dict] | None = None
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
    repack_with = ("legacy", {})        # by the byte map `repack`
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
                self.tok_offset(j)]

    def tok_offset(self, j):
        """The block's offset term from the activations: -8 (-16) times its quant sum, as the dot product's start."""
        return f"xc{j} = vshl(load_i4_bcast4(XS, xs{j}), {self.bias_shift})"

    def acc_part(self, i, j, p):
        return [f"acc{i}_{j} = fma(cvt(dpbusd(dpbusd({self.dot_start(j)}, lo{i}, xl{j}), hi{i}, xh{j})), "
                f"fmul(dw{i}, dx{j}), {self.acc_in(i, j)})"]

    def dot_start(self, j):
        return f"xc{j}"

    def acc_in(self, i, j):
        return f"acc{i}_{j}"


class Q4_0W(Spec):
    """q4_0 in wide groups of 16 blocks (512 weights, 288 bytes), one block per i32 lane (the k-quants' sub-block
    idea, `_K2`): 64-byte load k (k = 0..3) of the group's 256 quant bytes holds in lane j bytes 4k..4k+3 of block
    j's 16 (low nibbles: weights 4k..4k+3, high: 16+4k..16+4k+3), then the 16 fp16 scales, d of block j at half j
    (one vcvtph2ps, no permute). The activations follow (q8.quantize_q8_0_wide: per group and k a "lo" and a "hi"
    64-byte vector, 16 d, 16 offset terms -8 * sum(q) as the chain's start). Per row and token a group then takes 8
    vpdpbusd and ONE cvt + fmul + fma: 11 vector ops per 512 weights where `Q4_0` (4 blocks per zmm, so every
    128 weights a conversion and a scaling) takes 20, plus per token 4 vpermps/vpermd + shift pairs of set-up; the
    per-token set-up here is plain loads. Measured in bench/results/2026-12-07.md (q4_0 and q8_0 in wide groups).
    Rows whose block count is not a multiple of 16 are padded with zero blocks (d = 0: they add exact zeros) when
    that costs at most 1/32 of the row (a 7B's ffn_down: 344 blocks + 8); shorter ragged rows keep `Q4_0`
    (fast.prepare_fast)."""
    name, layout, block_bytes = "q4_0", "wide", 18
    step_w, step_bytes, xq_step, xd_step, xs_step = 512, 288, 512, 16, 16
    group_blocks = 16
    prefetch_short = True
    repack_with = ("legacy", {})
    consts = {"M4": "splat_i(0x0F0F0F0F)"}
    repack = [(j, 2 + 4 * k + b) for k in range(4) for j in range(16) for b in range(4)] + [
        (j, c) for j in range(16) for c in range(2)]
    d_off = 256
    # A step in 4 parts of 64 weight bytes: part p's two weight vectors of each row meet two activation loads of
    # each token, so a tile of 4 rows x 4 tokens holds 16 dot products, 8 weight vectors and 2 activation vectors
    # live (the whole step's 8 vectors per row spilled ~170 zmm per step at 4 rows). 4 x 4 tiles read a quarter
    # of an activation load per vpdpbusd: 4 tokens of an 11008-wide row (56 KB of activations, past L1) come from
    # L2 at that rate. The tiles' prefetch runs one row tile ahead (pf_tile).
    parts = 4
    tile_r = few_r = 4
    tile_t = 4
    pf_tile = True

    def row_part(self, i, p):
        L = [f"w{i}_{p} = load_i(W, wb{i} + {64 * p})", f"lo{i}_{p} = vand(w{i}_{p}, M4)",
             f"hi{i}_{p} = vand(vshr(w{i}_{p}, 4), M4)"]
        return L + ([f"dw{i} = load_h16(W, wb{i} + {self.d_off})"] if p == self.parts - 1 else [])

    def terms(self, i, p):
        """The weight vectors of part p of row i, in the order of their vpdpbusd (activations at xq + 128p, +64)."""
        return [f"lo{i}_{p}", f"hi{i}_{p}"]

    def acc_part(self, i, j, p):
        # lane j starts at -8 * sum(q) of block j (q8_0: -128 * sum): the quants' offset
        dot = f"load_i(XS, xs{j})" if p == 0 else f"dot{i}_{j}"
        for h, w in enumerate(self.terms(i, p)):
            dot = f"dpbusd({dot}, {w}, load_i(XQ, xq{j} + {128 * p + 64 * h}))"
        L = [f"dot{i}_{j} = {dot}"]
        if p == self.parts - 1:
            L.append(f"acc{i}_{j} = fma(cvt(dot{i}_{j}), fmul(dw{i}, load_f(XD, xd{j})), acc{i}_{j})")
        return L


class Q8_0W(Q4_0W):
    """q8_0 in wide groups of 16 blocks (544 bytes), as `Q4_0W`: 64-byte load m = 2k + h of the group's 512 quant
    bytes holds in lane j bytes 16h + 4k .. 16h + 4k + 3 of block j, the order of the wide activations' "lo" (h = 0)
    and "hi" (h = 1) vectors; then the 16 fp16 scales. As `Q8_0` on VNNI the weights enter as w + 128 (unsigned) and
    the activations' block sums times -128 start the chain: 8 vpdpbusd and one cvt + fmul + fma per row, token and
    512 weights where `Q8_0` takes 20 ops."""
    name, layout, block_bytes = "q8_0", "wide128", 34
    step_bytes = 544
    # the few-token mat-mat with the software prefetch of short rows (4 tokens in 0.42-0.66 of the 4-block groups'
    # time; without it 1.13-1.15), the mat-vec without it, as Q8_0 (with it 1.06-1.09 of the 4-block groups' time,
    # without 0.93-1.08: within the noise of those runs)
    prefetch_short = False
    few_prefetch = True
    consts = {"M80": f"splat_i({simd.bytes4(0x80)})"}
    repack = [(j, 2 + 16 * h + 4 * k + b) for k in range(4) for h in range(2) for j in range(16) for b in range(4)] + [
        (j, c) for j in range(16) for c in range(2)]
    d_off = 512

    def row_part(self, i, p):
        return [f"u{i}_{m} = vxor(load_i(W, wb{i} + {64 * m}), M80)" for m in (2 * p, 2 * p + 1)] + (
            [f"dw{i} = load_h16(W, wb{i} + {self.d_off})"] if p == self.parts - 1 else [])

    def terms(self, i, p):
        return [f"u{i}_{2 * p}", f"u{i}_{2 * p + 1}"]


class Q4_1(Q4_0):
    name, block_bytes, step_bytes = "q4_1", 20, 80
    consts = {"M4": "splat_i(0x0F0F0F0F)", "Z": "splat_i(0)"}
    repack = ([(b, 4 + j) for b in range(4) for j in range(16)] + [(b, k) for b in range(4) for k in range(2)]
              + [(b, 2 + k) for b in range(4) for k in range(2)])

    def row_part(self, i, p):
        return super().row_part(i, p) + [f"mw{i} = load_h4_bcast4(W, wb{i} + 72)"]

    def tok_offset(self, j):
        """The Q8_1 s of the block (d times its quant sum, over 4), for the min term m * s."""
        return f"xsf{j} = load_f4_bcast4(XF, xs{j})"

    def dot_start(self, j):
        return "Z"

    def acc_in(self, i, j):
        return f"fma(mw{i}, xsf{j}, acc{i}_{j})"


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
    few_r = 1           # one row at a time: each row's setup (scales, mins) already spans 4 tokens; measured fastest
    few_blocks = True

    def tok_setup(self, j):
        return [f"dx{j} = XD[xd{j}]", f"xb{j} = load_i(XS, xs{j})"]

    def tok_part(self, j, p):
        return [f"x{j}_{p} = load_i(XQ, xq{j} + {64 * p})"]

    def acc_part(self, i, j, p):
        prev = "Z" if p == 0 else f"is{i}_{j}"
        return [f"is{i}_{j} = dpwssd({prev}, maddubs(n{i}_{p}, x{j}_{p}), s{i}_{p})"]


# q2_K's 2-bit fields: part p = bits 2p, 2p+1 of every packed byte (simd.make_bitfield: one vgf2p8affineqb with
# GFNI instead of a shift and a mask, which measured faster; on q4_K's nibbles it gained nothing, the instruction
# shares the VNNI pipes there)
_BITFIELDS = {**{f"BF{2 * p}": (2 * p, 2) for p in range(4)},
              # Q3_K's 3-bit fields: n1 (X bits 3..5), n2's low bits (X bits 6, 7), n2's bit 2 and n3 from Y
              "BF33": (3, 3), "BF62": (6, 2), "YH2": (0, 1, 2, 1), "Y3": (2, 3, 0, 5),
              # Q6_K's high 2 bits of part p (bits 2p of H) as bits 4, 5 of its 6-bit quants
              **{f"H6{p}": (2 * p, 2, 4) for p in range(4)}}


class _K2(KSpec):
    """q2_K and q3_K (`repack_k2`; q4_K and q5_K by `repack_k4`), repacked once at load so that i32 lane k of every
    64-byte part belongs to the 16-weight sub-block k (byte 4k + b of part p = weight 16k + 4p + b; the activations
    follow, q8.PERM_SUB). The four parts' vpdpbusd then run into one accumulator whose lanes are whole sub-block sums,
    scaled by one vpdpwssd against the scales as the low words of the lanes (a sub-block sum fits in 16 bits). The
    file's order has every part on other sub-blocks: there each pair of parts took a vpackssdw, a scale-word shuffle
    and a vpdpwssd."""
    layout, parts = "k_sub", 4
    prefetch_short = True   # repacked (anonymous memory): measured faster from DRAM with it

    def acc_part(self, i, j, p):
        return [f"A{i}_{j} = dpbusd({self.acc_start(j) if p == 0 else f'A{i}_{j}'}, n{i}_{p}, x{j}_{p})"]

    def acc_start(self, j):
        return "Z"

    def with_mins(self, i, j, isum, mins):
        """acc += cvt(isum) * d * dx + mins * dmin * XF: the min term (q2_K, q4_K, q5_K) in float against XF = -dx *
        the 16-element sums (q8.quantize_q8_K), lane k's min in `mins`: one conversion of the row's mins and two
        float ops instead of a vpdpwssd, its conversion and the scalar dm * dx."""
        return [f"acc{i}_{j} = fma(cvt({isum}), splat_f(d{i} * dx{j}), "
                f"fma(fmul({mins}, splat_f(dm{i})), load_f(XF, xs{j}), acc{i}_{j}))"]


class Q6_K(_K2):
    """q6_K repacked at load (`repack_k6`, same 210 bytes) into the `_K2` lane order: [L0 64][L1 64][H 64][scales 16]
    [d 2], part p's 6-bit quant at position m = nibble p % 2 of L(p // 2) | bits 2p, 2p + 1 of H << 4. The four parts'
    vpdpbusd run into one accumulator started at -32 times the sub-block sums (the quants' offset), so lane k holds
    sub-block k's integer dot product (|.| <= 16 * 32 * 128, over a word: one vpmulld by its int8 scale, not a
    vpdpwssd). The file's order took per super-block two vpackssdw, two scale-word shuffles, three vpdpwssd and a
    shift and subtract for the offset per row and token."""
    name, block_bytes, step_bytes = "q6_K", 210, 210
    # without the software prefetch of short rows: 7B slice, 2 threads, mat-vec 50-52 GB/s per CPU-second of each
    # thread without it, 43-45 with it (with the file's order read in place it had gained 17 %)
    prefetch_short = False
    # column blocks gained nothing here (4 tokens of 4096x11008: 2.77 mat-vecs whole, 2.86 in blocks)
    few_blocks = False
    consts = {"Z": "splat_i(0)", "M4": "splat_i(0x0F0F0F0F)"}
    repack_with = ("k6", {})

    def row_setup(self, i):
        return [f"scl{i} = load_i8x16(W, wb{i} + 192)", f"d{i} = load_h1(W, wb{i} + 208)",
                f"H{i} = load_i(W, wb{i} + 128)"]

    def row_part(self, i, p):
        c = p // 2
        lines = [f"L{i}_{c} = load_i(W, wb{i} + {64 * c})"] if p % 2 == 0 else []
        nib = f"vand(L{i}_{c}, M4)" if p % 2 == 0 else f"vand(vshr(L{i}_{c}, 4), M4)"
        return lines + [f"n{i}_{p} = vor({nib}, H6{p}(H{i}))"]

    def tok_setup(self, j):
        # XS of the k_sub layout holds -4 times the sub-block sums: times 8 gives the -32 offset
        return super().tok_setup(j) + [f"xo{j} = vshl(xb{j}, 3)"]

    def acc_start(self, j):
        return f"xo{j}"

    def acc_final(self, i, j):
        return [f"acc{i}_{j} = fma(cvt(vmul(A{i}_{j}, scl{i})), splat_f(d{i} * dx{j}), acc{i}_{j})"]


class Q3_K(_K2):
    """110-byte blocks [scales 6][d 2][scales 6][X 64][Y 32] (AVX-512 VBMI; `Q3_K_I8` otherwise). With n_p = the 3-bit
    quant of part p (low 2 bits + 4 * high bit, 0..7; the value is n - 4) at byte m of the `_K2` order: X[m] = n0 |
    n1 << 3 | (n2 & 3) << 6; Y[m] (m < 32) = n2(m) >> 2 | (n2(32 + m) >> 2) << 1 | n3(m) << 2 | n3(32 + m) << 5.
    Each part is then one or two bit-field ops (Y read into both 256-bit halves, each half taking its own bits): 6
    vector ops per super-block for the quants, where the file's 2-bit fields plus high-bit mask took 13 (4 fields, 4
    vptestmb, 4 masked adds, one more for part 0). The 16 scales (minus 32, as 6-bit two's complement) are re-packed
    at load so that one `vpmultishiftqb` and one `vpsraw` give the `vpdpwssd` operand (simd.load_q3k_scales): the
    file's size, where the int8 scales of `Q3_K_I8` stream 114 bytes per super-block. The quants' -4 offset enters
    as the accumulator's start, the activation block sums times -4."""
    name, block_bytes, step_bytes = "q3_K", 110, 110
    consts = {"Z": "splat_i(0)", "M7": f"splat_i({simd.bytes4(7)})"}
    repack_with = ("k2", {"q3": True, "packed": True})
    x_off, y_off, d_off = 14, 78, 6

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
    repack_with = ("k2", {"q3": True, "packed": False})
    x_off, y_off, d_off = 0, 64, 112

    def scales(self, i):
        return f"scl{i} = vand(load_i8x16(W, wb{i} + 96), MW)"


class Q2_K(_K2):
    name, block_bytes, step_bytes = "q2_K", 84, 84
    consts = {"Z": "splat_i(0)", "M15": "splat_i(15)"}
    repack_with = ("k2", {"q3": False, "packed": False})

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
    vpackssdw per pair of parts, two vpdpwssd and two word-scale builds; the prompt's mat-mat gains most. The 6-bit
    scales/mins stay packed (an unpacked copy measured as fast from L3 and slower from DRAM)."""
    name, block_bytes, step_bytes = "q4_K", 144, 144
    consts = {"Z": "splat_i(0)", "M4": "splat_i(0x0F0F0F0F)"}
    repack_with = ("k4", {"q5": False})
    qs_off = 16
    # AVX2 has no vpdpbusd: each one there is vpmaddubsw + vpmaddwd + vpaddd. The parts' vpmaddubsw words are summed
    # as words instead (lane k's two words: 8 products each, <= 8 * 31 * 128 even for q5_K's 5-bit quants) and one
    # vpmaddwd against the scale in both words of the lane gives the scaled sub-block sum: 8 instructions per 256-bit
    # half where the vpdpbusd chain took 13 (16 for q5_K)
    words = ISA == "avx2"

    def row_setup(self, i):
        return [f"scm{i} = q4k_scales(W, wb{i} + 4)", f"sc{i} = K4SC(scm{i})", f"mn{i} = cvt(K4MN(scm{i}))",
                f"d{i} = load_h1(W, wb{i})", f"dm{i} = load_h1(W, wb{i} + 2)"] + (
                [f"scw{i} = vor(sc{i}, vshl(sc{i}, 16))"] if self.words else [])

    def acc_part(self, i, j, p):
        if not self.words:
            return super().acc_part(i, j, p)
        m = f"maddubs(n{i}_{p}, x{j}_{p})"
        return [f"S{i}_{j} = {m}" if p == 0 else f"S{i}_{j} = vaddw(S{i}_{j}, {m})"]

    def nibbles(self, i, p):
        c, o = p // 2, self.qs_off + 64 * (p // 2)
        if p % 2 == 0:
            return [f"w{i}_{c} = load_i(W, wb{i} + {o})", f"n{i}_{p} = vand(w{i}_{c}, M4)"]
        return [f"n{i}_{p} = vand(vshr(w{i}_{c}, 4), M4)"]

    def row_part(self, i, p):
        return self.nibbles(i, p)

    def acc_final(self, i, j):
        isum = f"dpwssd(Z, S{i}_{j}, scw{i})" if self.words else f"dpwssd(Z, A{i}_{j}, sc{i})"
        return self.with_mins(i, j, isum, f"mn{i}")     # lane k: sub-block k // 2's min


class Q5_K(Q4_K):
    """q5_K likewise (`repack_k4`, 176 bytes; the 32 bytes of high bits re-ordered so that bit p / 4 + p of byte m is
    part p's fifth bit at position m / 32 + m). Five-bit quants: 16 products no longer fit a word, so parts 0-1 and
    2-3 run into two accumulators and take one vpdpwssd each."""
    name, block_bytes, step_bytes = "q5_K", 176, 176
    qs_off = 48
    consts = dict(Q4_K.consts, **{f"HB{p}": f"halves_i({simd.bytes4(1 << p)}, {simd.bytes4(1 << (4 + p))})"
                                   for p in range(4)})
    repack_with = ("k4", {"q5": True})

    def row_setup(self, i):
        return super().row_setup(i) + [f"qh{i} = load_i_dup256(W, wb{i} + 16)"]

    def row_part(self, i, p):
        lines = self.nibbles(i, p)
        lines[-1] = lines[-1].replace(f"n{i}_{p} = ", f"n{i}_{p} = add_nz(") + f", vand(qh{i}, HB{p}), 16)"
        return lines

    def acc_part(self, i, j, p):
        if self.words:
            return super().acc_part(i, j, p)
        a = f"A{i}_{j}" if p < 2 else f"B{i}_{j}"
        return [f"{a} = dpbusd({'Z' if p % 2 == 0 else a}, n{i}_{p}, x{j}_{p})"]

    def acc_final(self, i, j):
        if self.words:
            return super().acc_final(i, j)
        return self.with_mins(i, j, f"dpwssd(dpwssd(Z, A{i}_{j}, sc{i}), B{i}_{j}, sc{i})", f"mn{i}")


class F16(Spec):
    name, layout, block_bytes, block_w = "f16", "f16", 2, 1
    # Activations are rounded to fp16 as llama.cpp does. The mat-vec keeps them as fp16 bytes in XQ (half the
    # traffic, so the row stays in L1); the mat-mat, bound by FMA throughput, takes them widened to f32 so that only
    # the weights need a conversion per step.
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
    (GGMLType.Q4_K, Q4_K), (GGMLType.Q5_K, Q5_K), (GGMLType.Q6_K, Q6_K), (GGMLType.F16, F16)]}
# the one-block-per-lane layouts of legacy types, for rows of enough blocks (fast.prepare_fast picks per weight);
# AVX-512 only so far: with 16 ymm registers AVX2 would hold a row's 8 nibble vectors in half of them (not measured)
WIDE: dict[int, Spec] = {int(GGMLType.Q4_0): Q4_0W(), int(GGMLType.Q8_0): Q8_0W()} if ISA == "avx512vnni" else {}


def wide_fits(spec: Spec, n_blk: int) -> bool:
    """Whether a row of n_blk blocks takes the wide layout: padding to whole groups costs at most 1/32 of it."""
    return (-n_blk) % spec.group_blocks * 32 <= n_blk


def all_specs() -> list[Spec]:
    """Every spec this CPU may use (one kernel module each)."""
    return [*SPECS.values(), *WIDE.values()]


def supported_types() -> list[int]:
    """GGML type ids that have a fast kernel on this CPU (empty without AVX2)."""
    return sorted(SPECS) if ISA != "none" else []


# per k-quant activation layout, the quantize_q8_K arguments (byte order q8.LAYOUT_*, bmul): the k_sub types take the
# block sums times -4 (Q3_K.acc_start); used by the generator and by fast.FastWeight
Q8K_ARGS = {"k_sub": (q8.LAYOUT_SUB, -4)}
# per wide legacy layout, what quantize_q8_0_wide multiplies the block sums by: q4_0's offset -8, q8_0's -128 (its
# weights enter the unsigned operand of vpdpbusd as w + 128)
WIDE_ARGS = {"wide": -8, "wide128": -128}
# layouts whose activations carry XF (the Q8_1 s of q4_1/q5_1; the float min terms of q2_K, q4_K, q5_K)
WITH_XF = ("nib", "k_sub")

# Module-level values the fragments name (SW0, BF2, K4SC, ...), defined at the top of every generated module.
PREAMBLE = ([f"{name} = make_bitfield{args}" for name, args in _BITFIELDS.items()]
            + [f"K4SC = make_lanes({[k // 2 for k in range(16)]})",         # lane k <- scale of sub-block k // 2
               f"K4MN = make_lanes({[8 + k // 2 for k in range(16)]})"])    # lane k <- its min
