"""512-bit vector values and x86 integer dot-product instructions for Numba kernels, emitted through llvmlite.

LLVM's auto-vectorizer never produces `vpdpbusd` / `vpmaddubsw` from Numba code (Numba widens integer arithmetic to
64 bits: the assembly shows `vpmuldq` / `vpaddq` on 8 lanes), so the fast kernels spell the vector code out: a value of
type `I512` is an LLVM `<16 x i32>` (64 bytes, also used as 64 int8 lanes), `F512` a `<16 x float>`. They live in
ordinary variables of `@njit` code and stay in zmm registers.

Only one intrinsic is ISA-specific: `dpbusd(acc, u, s)` (acc + dot of 4 unsigned bytes of `u` with 4 signed bytes of
`s` per i32 lane). On AVX-512 VNNI it is `vpdpbusd`; on AVX2 it is `vpmaddubsw` + `vpmaddwd` on each 256-bit half
(the unsigned operand must then be <= 127 so the 16-bit pair sums cannot saturate: true for every weight format here,
q8_0 goes through `dot_s8s8`). All other operations are plain LLVM vector IR, which LLVM splits into two 256-bit
halves on AVX2.

`ISA` is decided once, at import, from the host CPU features (`AIRO_SIMD=avx512vnni|avx2|none` overrides, for tests).
It must be decided before anything is compiled: LLVM aborts the process when asked for an instruction the target lacks.
"""
from __future__ import annotations

import inspect
import os

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


_ISAS = ("avx512vnni", "avx2", "none")


def detect_isa(env: str | None = None) -> str:
    """Best instruction set the host supports, or the one forced by AIRO_SIMD (never one the host lacks)."""
    feats = {k for k, v in llb.get_host_cpu_features().items() if v}
    have = ["none"]
    if {"avx2", "fma", "f16c"} <= feats:
        have.insert(0, "avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512vnni", "fma", "f16c"} <= feats:
        have.insert(0, "avx512vnni")
    want = (env if env is not None else os.environ.get("AIRO_SIMD", "")).strip().lower()
    if not want or want == "auto":
        return have[0]
    if want not in _ISAS:
        raise ValueError(f"AIRO_SIMD={want!r}: expected one of {', '.join(_ISAS)} or auto")
    return want if want in have else "none"


ISA = detect_isa()


# ----------------------------------------------------------------------------------------------- vector types
class Vec(types.Type):
    """An LLVM vector value of `n` lanes of `kind` ('i32' or 'f32')."""

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n
        super().__init__(name=f"Vec{n}x{kind}")


_ELT = {"i32": ir.IntType(32), "f32": ir.FloatType()}


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_ELT[fe_type.kind], fe_type.n))


I512 = Vec("i32", 16)
F512 = Vec("f32", 16)
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_F32 = ir.FloatType()
_VI = ir.VectorType(_I32, 16)
_VF = ir.VectorType(_F32, 16)
_VB = ir.VectorType(_I8, 64)
_V16W = ir.VectorType(ir.IntType(16), 16)     # 16 x i16: one 256-bit vector of words


def _ptr_at(context, builder, arrty, arr, idxty, idx):
    """Pointer to element `idx` of a C-contiguous array (element units of the array's dtype)."""
    ary = context.make_array(arrty)(context, builder, arr)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(ary.data, [i])


# Newer llvmlite takes the loaded type as `typ=` (opaque pointers need it); llvmlite 0.42, which comes with numba 0.59
# (text-generation-webui 2.8.1 pins it), reads the type from the typed pointer and refuses the keyword.
_LOAD_TAKES_TYPE = "typ" in inspect.signature(ir.IRBuilder.load).parameters


def _load(builder, ptr, vty):
    """Unaligned load of a `vty` value at `ptr`."""
    p = builder.bitcast(ptr, vty.as_pointer())
    return builder.load(p, align=1, typ=vty) if _LOAD_TAKES_TYPE else builder.load(p, align=1)


def _const_vec(elt, values):
    return ir.Constant(ir.VectorType(elt, len(values)), [ir.Constant(elt, int(v)) for v in values])


def _shuffle(builder, a, mask, b=None):
    b = ir.Constant(a.type, None) if b is None else b
    return builder.shuffle_vector(a, b, _const_vec(_I32, mask))


# ----------------------------------------------------------------------------------------------- loads
@intrinsic
def load_i(typingctx, arr, idx):
    """64 bytes from array `arr` starting at element `idx` (any dtype), as I512."""
    def codegen(context, builder, sig, args):
        return _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]), _VI)
    return I512(arr, idx), codegen


@intrinsic
def load_f(typingctx, arr, idx):
    """16 float32 from a float32 array starting at element `idx`."""
    def codegen(context, builder, sig, args):
        return _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]), _VF)
    return F512(arr, idx), codegen


def _make_load_dup(n_i32):
    @intrinsic
    def load_dup(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                      ir.VectorType(_I32, n_i32))
            return _shuffle(builder, v, list(range(n_i32)) * (16 // n_i32))
        return I512(arr, idx), codegen
    return load_dup


load_i_dup256 = _make_load_dup(8)     # 32 bytes at element `idx`, repeated into both 256-bit halves
load_i_dup128 = _make_load_dup(4)     # 16 bytes, repeated into all four 128-bit chunks (one q4_0 block's quants)


@intrinsic
def load_h16(typingctx, arr, idx):
    """16 IEEE halves (32 bytes) at element `idx` of a uint8/uint16 array, widened to float32 (vcvtph2ps)."""
    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                  ir.VectorType(ir.HalfType(), 16))
        return builder.fpext(v, _VF)
    return F512(arr, idx), codegen


def _make_load_half_bcast(n_half, rep):
    @intrinsic
    def load_half_bcast(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                      ir.VectorType(ir.HalfType(), n_half))
            f = builder.fpext(v, ir.VectorType(_F32, n_half))
            return _shuffle(builder, f, [i // rep for i in range(16)])
        return F512(arr, idx), codegen
    return load_half_bcast


load_h4_bcast4 = _make_load_half_bcast(4, 4)   # 4 halves -> lanes 4k..4k+3 = h[k] (legacy 4-block groups)
load_h2_bcast8 = _make_load_half_bcast(2, 8)   # 2 halves -> lanes 8k..8k+7 = h[k] (two q8_0 blocks of 32 bytes)


@intrinsic
def load_i8x16(typingctx, arr, idx):
    """16 signed bytes at element `idx`, sign-extended to 16 i32 lanes."""
    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                  ir.VectorType(_I8, 16))
        return builder.sext(v, _VI)
    return I512(arr, idx), codegen


@intrinsic
def load_u8x16(typingctx, arr, idx):
    """16 unsigned bytes at element `idx`, zero-extended to 16 i32 lanes."""
    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                  ir.VectorType(_I8, 16))
        return builder.zext(v, _VI)
    return I512(arr, idx), codegen


def _add_where(context, builder, mask, a, val, valty):
    """Byte lane k of I512 `a` plus scalar `val` where bit k of the <64 x i1> `mask` is set (merge-masked vpaddb)."""
    a8 = builder.bitcast(a, _VB)
    v8 = builder.trunc(context.cast(builder, val, valty, types.int32), _I8)
    return builder.bitcast(builder.select(mask, builder.add(a8, _splat(builder, v8, _VB)), a8), _VI)


@intrinsic
def add_mask64(typingctx, a, arr, idx, val):
    """Byte lane k = byte k of `a` + `val` where bit k of the 8 bytes at element `idx` is set (a k-mask load and one
    merge-masked vpaddb: q5's fifth bits)."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[1], args[1], sig.args[2], args[2])
        m = _load(builder, p, ir.IntType(64))
        mb = builder.bitcast(m, ir.VectorType(ir.IntType(1), 64))
        return _add_where(context, builder, mb, args[0], args[3], sig.args[3])
    return I512(a, arr, idx, val), codegen


def _fconst(v: float) -> ir.Constant:
    return ir.Constant(_VF, [ir.Constant(_F32, float(np.float32(v)))] * 16)


def _vcall(builder, name, args):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF] * len(args)), name)
    return builder.call(f, args)


@intrinsic
def exp_f(typingctx, a):
    """exp of 16 float32 lanes, ggml's `ggml_v_expf` polynomial (within ~2 ulp of expf); inputs are clamped to
    [-87, 88] (-inf included): exp(-87) ~ 1.6e-38 instead of underflowing (softmax's s - max: such terms vanish in
    the sum and the fp16 rounding), exp(88) ~ 1.7e38 instead of inf (SiLU's 1 + exp(-z)). Why: Numba's scalar
    math.exp does not vectorize, and it was most of a long-context softmax.
    Written with LLVM intrinsic calls (maxnum, roundeven, fma) where order matters: Numba's fastmath pass puts
    'fast' flags on every fadd/fmul of the module, which would let LLVM reassociate the range reduction."""
    def codegen(context, builder, sig, args):
        x = _vcall(builder, "llvm.minnum.v16f32", [_vcall(builder, "llvm.maxnum.v16f32", [args[0], _fconst(-87.0)]),
                                                    _fconst(88.0)])
        n = _vcall(builder, "llvm.roundeven.v16f32", [builder.fmul(x, _fconst(float.fromhex("0x1.715476p+0")))])
        b = _vcall(builder, "llvm.fma.v16f32", [n, _fconst(-float.fromhex("0x1.62e4p-1")), x])
        b = _vcall(builder, "llvm.fma.v16f32", [n, _fconst(-float.fromhex("0x1.7f7d1cp-20")), b])
        u = builder.fmul(b, b)
        fma3 = lambda p, q, r: _vcall(builder, "llvm.fma.v16f32", [p, q, r])  # noqa: E731
        p1 = fma3(_fconst(float.fromhex("0x1.0e4020p-7")), b, _fconst(float.fromhex("0x1.573e2ep-5")))
        p2 = fma3(_fconst(float.fromhex("0x1.555e66p-3")), b, _fconst(float.fromhex("0x1.fffdb6p-2")))
        j = fma3(fma3(p1, u, p2), u, builder.fmul(_fconst(float.fromhex("0x1.ffffecp-1")), b))
        e = builder.shl(builder.fptosi(n, _VI), ir.Constant(_VI, [ir.Constant(_I32, 23)] * 16))
        k = builder.bitcast(builder.add(e, ir.Constant(_VI, [ir.Constant(_I32, 0x3F800000)] * 16)), _VF)
        return fma3(j, k, k)
    return F512(F512), codegen


def _make_store(vty, vtype):
    @intrinsic
    def store(typingctx, arr, idx, v):
        def codegen(context, builder, sig, args):
            p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            builder.store(args[2], builder.bitcast(p, vty.as_pointer()), align=1)
            return context.get_dummy_value()
        return types.void(arr, idx, vtype), codegen
    return store


store_f = _make_store(_VF, F512)     # 16 float32 (64 bytes) at element `idx` of an array of any dtype
store_i = _make_store(_VI, I512)     # an I512 (64 bytes) at element `idx` of an array of any dtype


@intrinsic
def store_i_lo256(typingctx, arr, idx, v):
    """The low 256 bits (32 bytes) of an I512 at element `idx` of an array of any dtype."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        lo = _shuffle(builder, args[2], list(range(8)))
        builder.store(lo, builder.bitcast(p, lo.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(arr, idx, I512), codegen


@intrinsic
def store_h16(typingctx, arr, idx, v):
    """Store F512 rounded to 16 IEEE halves (round to nearest even, `vcvtps2ph`) at element `idx` (32 bytes)."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        hv = builder.fptrunc(args[2], ir.VectorType(ir.HalfType(), 16))
        builder.store(hv, builder.bitcast(p, hv.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(arr, idx, F512), codegen


@intrinsic
def round_h16(typingctx, v):
    """F512 rounded to fp16 precision and widened back (what an fp16 store and reload would give)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.VectorType(ir.HalfType(), 16)), _VF)
    return F512(F512), codegen


@intrinsic
def prefetch_l2(typingctx, arr, idx):
    """Prefetch the cache line holding element `idx` into L2 (`prefetcht1`); never faults, so `idx` may run past
    the array. Why: on this kind of VM the hardware prefetcher stops following the weight stream once the activation
    row no longer fits L1 beside it (65B ffn_down ran at about a third of its speed from L3); an explicit L2 prefetch
    ~8 KB ahead keeps one core streaming at the kernel's own speed for every row length."""
    def codegen(context, builder, sig, args):
        p = builder.bitcast(_ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]), _I8.as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])  # read, L2, data
        return context.get_dummy_value()
    return types.void(arr, idx), codegen


# ----------------------------------------------------------------------------------------------- arithmetic
def _splat(builder, scalar, vty):
    v = builder.insert_element(ir.Constant(vty, None), scalar, ir.Constant(_I32, 0))
    return _shuffle(builder, v, [0] * vty.count)


@intrinsic
def splat_i(typingctx, x):
    """Every i32 lane = x (also: 4 bytes repeated, e.g. splat_i(0x0F0F0F0F))."""
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32), _VI)
    return I512(x), codegen


@intrinsic
def splat_f(typingctx, x):
    """Every float lane = x."""
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), _VF)
    return F512(x), codegen


def _binop_i(opname):
    @intrinsic
    def op(typingctx, a, b):
        if a != I512 or b != I512:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, opname)(args[0], args[1])
        return I512(a, b), codegen
    return op


vand = _binop_i("and_")
vor = _binop_i("or_")
vxor = _binop_i("xor")
vadd = _binop_i("add")
vsub = _binop_i("sub")
vmul = _binop_i("mul")          # i32 lanes, low 32 bits of the product (vpmulld)
vshrv = _binop_i("lshr")        # per-lane logical right shift by a vector
vshlv = _binop_i("shl")


def _shift(opname):
    @intrinsic
    def op(typingctx, a, n):
        def codegen(context, builder, sig, args):
            s = _splat(builder, context.cast(builder, args[1], sig.args[1], types.int32), _VI)
            return getattr(builder, opname)(args[0], s)
        return I512(a, n), codegen
    return op


vshr = _shift("lshr")           # i32 lanes >> n (logical); mask afterwards for byte lanes
vshl = _shift("shl")


@intrinsic
def halves_i(typingctx, a, b):
    """i32 lanes 0..7 = a, lanes 8..15 = b (a shift-count or mask vector)."""
    def codegen(context, builder, sig, args):
        va = _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32), _VI)
        vb = _splat(builder, context.cast(builder, args[1], sig.args[1], types.int32), _VI)
        return _shuffle(builder, va, list(range(8)) + list(range(24, 32)), vb)
    return I512(a, b), codegen


@intrinsic
def add_nz(typingctx, a, m, val):
    """Byte lane k = byte k of `a` + `val` where byte k of `m` is non-zero, else byte k of `a` (one vptestmb and one
    merge-masked vpaddb)."""
    def codegen(context, builder, sig, args):
        nz = builder.icmp_unsigned("!=", builder.bitcast(args[1], _VB), ir.Constant(_VB, None))
        return _add_where(context, builder, nz, args[0], args[2], sig.args[2])
    return I512(a, m, val), codegen


@intrinsic
def cvt(typingctx, a):
    """i32 lanes -> float lanes (vcvtdq2ps)."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF)
    return F512(a), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c, lane-wise float."""
    def codegen(context, builder, sig, args):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF] * 3), "llvm.fma.v16f32")
        return builder.call(f, args)
    return F512(a, b, c), codegen


def _binop_f(opname):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return getattr(builder, opname)(args[0], args[1])
        return F512(a, b), codegen
    return op


fmul = _binop_f("fmul")
fadd = _binop_f("fadd")
fsub = _binop_f("fsub")
fdiv = _binop_f("fdiv")


@intrinsic
def fmax(typingctx, a, b):
    """Lane-wise maximum of two F512 (`vmaxps`)."""
    def codegen(context, builder, sig, args):
        return _vcall(builder, "llvm.maxnum.v16f32", [args[0], args[1]])
    return F512(a, b), codegen


def _tree_sum(builder, v, add):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = _shuffle(builder, v, list(range(n)))
        hi = _shuffle(builder, v, list(range(n, 2 * n)))
        v = add(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def hsum_f(typingctx, a):
    """Sum of the 16 float lanes (float32)."""
    def codegen(context, builder, sig, args):
        return _tree_sum(builder, args[0], builder.fadd)
    return types.float32(a), codegen


# ----------------------------------------------------------------------------------------------- activation quantizers
# What kernels/q8.py needs to quantize a row 16 floats at a time. Minimum and maximum are compare + select, which is
# `vminps`/`vmaxps` itself (maxnum/minnum add NaN fix-ups); a NaN in an activation row gives garbage either way.
def _fsel(pred):
    return lambda builder: (lambda a, b: builder.select(builder.fcmp_ordered(pred, a, b), a, b))


def _isel(pred):
    return lambda builder: (lambda a, b: builder.select(builder.icmp_signed(pred, a, b), a, b))


def _make_vbinop(vt, sel):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return sel(builder)(args[0], args[1])
        return vt(a, b), codegen
    return op


vmax_f = _make_vbinop(F512, _fsel(">"))     # lane-wise max / min (float, signed i32)
vmin_f = _make_vbinop(F512, _fsel("<"))
vmin_i = _make_vbinop(I512, _isel("<"))


def _make_hreduce(ret, sel):
    @intrinsic
    def op(typingctx, a):
        def codegen(context, builder, sig, args):
            return _tree_sum(builder, args[0], sel(builder))
        return ret(a), codegen
    return op


hmax_f = _make_hreduce(types.float32, _fsel(">"))       # the largest / smallest of the 16 float lanes
hmin_f = _make_hreduce(types.float32, _fsel("<"))
hsum_i = _make_hreduce(types.int32, lambda builder: builder.add)   # the sum of the 16 i32 lanes


@intrinsic
def fabs_v(typingctx, a):
    """|a| lane-wise."""
    def codegen(context, builder, sig, args):
        return _vcall(builder, "llvm.fabs.v16f32", [args[0]])
    return F512(a), codegen


@intrinsic
def rint_i(typingctx, a):
    """Float lanes rounded to the nearest integer, ties to even (np.rint; llama.cpp's nearest_int), as i32 lanes."""
    def codegen(context, builder, sig, args):
        return builder.fptosi(_vcall(builder, "llvm.roundeven.v16f32", [args[0]]), _VI)
    return I512(a), codegen


@intrinsic
def store_b16(typingctx, arr, idx, v):
    """The 16 i32 lanes of v truncated to bytes (`vpmovdb`), stored at element `idx` (16 bytes)."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        b = builder.trunc(args[2], ir.VectorType(_I8, 16))
        builder.store(b, builder.bitcast(p, b.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(arr, idx, I512), codegen


@intrinsic
def store_b4(typingctx, arr, idx, v, g):
    """Lanes 4g..4g+3 of v truncated to bytes, stored at element `idx` (4 bytes): one 4-weight group of a row."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        w = builder.bitcast(builder.trunc(args[2], ir.VectorType(_I8, 16)), ir.VectorType(_I32, 4))
        e = builder.extract_element(w, context.cast(builder, args[3], sig.args[3], types.int32))
        builder.store(e, builder.bitcast(p, _I32.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(arr, idx, I512, g), codegen


@intrinsic
def round_h1(typingctx, x):
    """The float32 x rounded to the nearest IEEE half (ties to even, subnormals and overflow to inf as
    GGML_FP32_TO_FP16 does) and widened back."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.fpext(builder.fptrunc(v, ir.HalfType()), _F32)
    return types.float32(x), codegen


@intrinsic
def store_h1(typingctx, arr, idx, x):
    """The float32 x rounded to one IEEE half (as round_h1), stored at element `idx` (2 bytes; a block's scale)."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        h = builder.fptrunc(context.cast(builder, args[2], sig.args[2], types.float32), ir.HalfType())
        builder.store(h, builder.bitcast(p, ir.HalfType().as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(arr, idx, x), codegen


# ----------------------------------------------------------------------------------------------- dot products
def _dpbusd_vnni(builder, acc, u, s):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI] * 3),
                                       "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(f, [acc, u, s])


def _dpbusd_avx2(builder, acc, u, s):
    v32b = ir.VectorType(_I8, 32)
    v8d = ir.VectorType(_I32, 8)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16W, [v32b, v32b]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8d, [_V16W, _V16W]),
                                            "llvm.x86.avx2.pmadd.wd")
    ones = ir.Constant(_V16W, [ir.Constant(ir.IntType(16), 1)] * 16)
    halves = []
    for h in range(2):
        lanes = list(range(8 * h, 8 * h + 8))
        uh = builder.bitcast(_shuffle(builder, u, lanes), v32b)
        sh = builder.bitcast(_shuffle(builder, s, lanes), v32b)
        halves.append(builder.call(maddwd, [builder.call(maddubs, [uh, sh]), ones]))
    return builder.add(acc, _shuffle(builder, halves[0], list(range(16)), halves[1]))


@intrinsic
def dpbusd(typingctx, acc, u, s):
    """acc + sum over each 4-byte group of (unsigned byte of u) * (signed byte of s), per i32 lane."""
    if ISA not in ("avx512vnni", "avx2"):
        return None

    def codegen(context, builder, sig, args):
        impl = _dpbusd_vnni if ISA == "avx512vnni" else _dpbusd_avx2
        return impl(builder, *args)
    return I512(acc, u, s), codegen


@intrinsic
def dot_s8s8(typingctx, acc, a, b):
    """acc + dot of signed bytes a and b per 4-byte group (|a| * sign(a)·b; b must not hold -128)."""
    if ISA not in ("avx512vnni", "avx2"):
        return None

    def codegen(context, builder, sig, args):
        acc_, a, b = args
        ab = builder.bitcast(a, _VB)
        bb = builder.bitcast(b, _VB)
        zero = ir.Constant(_VB, None)
        neg = builder.icmp_signed("<", ab, zero)
        absa = builder.select(neg, builder.sub(zero, ab), ab)
        sb = builder.select(neg, builder.sub(zero, bb), bb)
        impl = _dpbusd_vnni if ISA == "avx512vnni" else _dpbusd_avx2
        return impl(builder, acc_, builder.bitcast(absa, _VI), builder.bitcast(sb, _VI))
    return I512(acc, a, b), codegen


@intrinsic
def maddubs(typingctx, u, s):
    """vpmaddubsw: 32 int16 lanes = u8(u) * s8(s) summed in adjacent pairs (saturating; keep u <= 127)."""
    if ISA not in ("avx512vnni", "avx2"):
        return None

    def codegen(context, builder, sig, args):
        return _maddubs(builder, args[0], args[1])
    return I512(u, s), codegen


def _maddubs(builder, u, s):
    if ISA == "avx512vnni":
        v64b = ir.VectorType(_I8, 64)
        v32w = ir.VectorType(ir.IntType(16), 32)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32w, [v64b, v64b]),
                                           "llvm.x86.avx512.pmaddubs.w.512")
        return builder.bitcast(builder.call(f, [builder.bitcast(u, v64b), builder.bitcast(s, v64b)]), _VI)
    v32b = ir.VectorType(_I8, 32)
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16W, [v32b, v32b]),
                                       "llvm.x86.avx2.pmadd.ub.sw")
    halves = []
    for h in range(2):
        lanes = list(range(8 * h, 8 * h + 8))
        uh = builder.bitcast(_shuffle(builder, u, lanes), v32b)
        sh = builder.bitcast(_shuffle(builder, s, lanes), v32b)
        halves.append(builder.bitcast(builder.call(f, [uh, sh]), ir.VectorType(_I32, 8)))
    return _shuffle(builder, halves[0], list(range(16)), halves[1])


@intrinsic
def vaddw(typingctx, a, b):
    """Lane-wise sum of the 32 int16 words of a and b (vpaddw; wraps, the callers keep the sums in range)."""
    def codegen(context, builder, sig, args):
        v32w = ir.VectorType(ir.IntType(16), 32)
        return builder.bitcast(builder.add(builder.bitcast(args[0], v32w), builder.bitcast(args[1], v32w)), _VI)
    return I512(a, b), codegen


@intrinsic
def dpwssd(typingctx, acc, a, b):
    """acc + per i32 lane: a.lo16*b.lo16 + a.hi16*b.hi16 (signed words; vpdpwssd / vpmaddwd+vpaddd)."""
    if ISA not in ("avx512vnni", "avx2"):
        return None

    def codegen(context, builder, sig, args):
        acc_, a_, b_ = args
        if ISA == "avx512vnni":
            f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI] * 3),
                                               "llvm.x86.avx512.vpdpwssd.512")
            return builder.call(f, [acc_, a_, b_])
        v8d = ir.VectorType(_I32, 8)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8d, [_V16W, _V16W]),
                                           "llvm.x86.avx2.pmadd.wd")
        halves = []
        for h in range(2):
            lanes = list(range(8 * h, 8 * h + 8))
            ah = builder.bitcast(_shuffle(builder, a_, lanes), _V16W)
            bh = builder.bitcast(_shuffle(builder, b_, lanes), _V16W)
            halves.append(builder.call(f, [ah, bh]))
        return builder.add(acc_, _shuffle(builder, halves[0], list(range(16)), halves[1]))
    return I512(acc, a, b), codegen


@intrinsic
def load_h1(typingctx, arr, idx):
    """One IEEE half at element `idx` (byte index of a uint8 array), as float32."""
    def codegen(context, builder, sig, args):
        p = _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        h = _load(builder, p, ir.HalfType())
        return builder.fpext(h, _F32)
    return types.float32(arr, idx), codegen


def bytes4(b: int) -> int:
    """The i32 with all four bytes = b (a byte-lane constant for splat_i)."""
    b &= 0xFF
    v = b * 0x01010101
    return v - (1 << 32) if v >= 1 << 31 else v


def _make_load4_bcast4(elt, vty):
    """4 elements (float32 or int32) at element `idx`, element k broadcast to lanes 4k..4k+3 (one 16-byte load and
    one vpermps/vpermd): the per-block values of the legacy 4-block groups."""
    vt = ir.VectorType(elt, 4)

    @intrinsic
    def load4(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]), vt)
            return _shuffle(builder, v, [k // 4 for k in range(16)])
        return vty(arr, idx), codegen
    return load4


load_f4_bcast4 = _make_load4_bcast4(_F32, F512)
load_i4_bcast4 = _make_load4_bcast4(_I32, I512)


def _q4k_scales(builder, ptr):
    """The 12 packed 6-bit scales/mins of a q4_K/q5_K super-block (16 bytes loaded at `ptr` = block + 4; the last 4
    are quants and ignored) unpacked as llama.cpp's get_scale_min_k4 into <16 x i8>: 8 scales, then 8 mins. 16-byte
    vector ops only, which cost a fraction of the 512-bit ones they replace."""
    v16 = ir.VectorType(_I8, 16)
    q = _load(builder, ptr, v16)
    z = ir.Constant(v16, None)
    a = _shuffle(builder, q, [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11])
    b = _shuffle(builder, q, [16, 16, 16, 16, 0, 1, 2, 3, 16, 16, 16, 16, 4, 5, 6, 7], z)
    lo = builder.and_(a, _const_vec(_I8, [63] * 4 + [15] * 4 + [63] * 4 + [0] * 4))
    hi = builder.and_(builder.lshr(a, _const_vec(_I8, [4] * 16)), _const_vec(_I8, [0] * 12 + [15] * 4))
    hb = builder.and_(builder.lshr(b, _const_vec(_I8, [2] * 16)), _const_vec(_I8, ([0] * 4 + [0x30] * 4) * 2))
    return builder.or_(builder.or_(lo, hi), hb)


@intrinsic
def q4k_scales(typingctx, arr, idx):
    """i32 lanes 0..7 = the 8 scales, 8..15 = the 8 mins of the q4_K/q5_K super-block whose packed scales start at
    byte `idx` (block + 4)."""
    def codegen(context, builder, sig, args):
        r = _q4k_scales(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]))
        return builder.zext(r, _VI)
    return I512(arr, idx), codegen


def make_lanes2(mask):
    """An intrinsic (a, b) -> I512 whose lane k is lane mask[k] of the 32 lanes a ++ b (one `vpermt2d`)."""
    mask = [int(m) for m in mask]
    assert len(mask) == 16 and all(0 <= m < 32 for m in mask)

    @intrinsic
    def lanes2(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return _shuffle(builder, args[0], mask, args[1])
        return I512(a, b), codegen
    return lanes2


def make_lanes(mask):
    """An intrinsic returning, as an I512, i32 lane mask[k] of its argument in lane k (one `vpermd`)."""
    mask = [int(m) for m in mask]
    assert len(mask) == 16 and all(0 <= m < 16 for m in mask)

    @intrinsic
    def lanes(typingctx, a):
        def codegen(context, builder, sig, args):
            return _shuffle(builder, args[0], mask)
        return I512(a), codegen
    return lanes


_HAS_GFNI = ISA == "avx512vnni" and bool(llb.get_host_cpu_features().get("gfni"))


def make_bitfield(lo: int, n: int, dst: int = 0, lo_hi: int | None = None):
    """An intrinsic: each byte of its I512 argument -> its bits lo..lo+n-1 (in the upper 256-bit half: bits
    lo_hi..lo_hi+n-1 if given), moved to bits dst..dst+n-1, the other bits 0.

    With GFNI one `vgf2p8affineqb` (a per-byte bit-matrix product, one matrix per 64-bit lane) replaces the shift and
    the mask; else a 32-bit lane shift and a byte mask. A field at bit 0 staying there is a plain AND either way: any
    ALU pipe runs that, while the affine op shares the VNNI pipes with the dot products
    (bench/results/2026-11-27.md)."""
    lo_hi = lo if lo_hi is None else lo_hi
    assert 1 <= n and 0 <= dst and dst + n <= 8 and all(0 <= x and x + n <= 8 for x in (lo, lo_hi))
    assert (lo - dst) * (lo_hi - dst) >= 0, "both halves must shift the same way"

    def qword(src):
        # gf2p8affine: result bit t = parity(matrix byte (7 - t) & x); byte (7 - (dst + i)) = 1 << (src + i)
        m = sum((1 << (src + i)) << (8 * (7 - dst - i)) for i in range(n))
        return m - (1 << 64) if m >= 1 << 63 else m
    matrix = [qword(lo)] * 4 + [qword(lo_hi)] * 4
    mask = ((1 << n) - 1) << dst
    plain_and = lo == lo_hi == dst

    @intrinsic
    def bitfield(typingctx, a):
        def codegen(context, builder, sig, args):
            if _HAS_GFNI and not plain_and:
                f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VB, [_VB, _VB, _I8]),
                                                   "llvm.x86.vgf2p8affineqb.512")
                mat = builder.bitcast(_const_vec(ir.IntType(64), matrix), _VB)
                return builder.bitcast(builder.call(f, [builder.bitcast(args[0], _VB), mat, ir.Constant(_I8, 0)]),
                                       _VI)
            v = args[0]
            if lo != dst or lo_hi != dst:
                shifts = _const_vec(_I32, [abs(lo - dst)] * 8 + [abs(lo_hi - dst)] * 8)
                v = builder.lshr(v, shifts) if lo >= dst and lo_hi >= dst else builder.shl(v, shifts)
            return builder.and_(v, _const_vec(_I32, [mask * 0x01010101] * 16))
        return I512(a), codegen
    return bitfield


_HAS_VBMI = ISA == "avx512vnni" and bool(llb.get_host_cpu_features().get("avx512vbmi"))


def q3k_scale_bit(lane: int) -> int:
    """Bit offset, within its 6-byte half, of the 6-bit field that `load_q3k_scales` puts in i32 lane `lane`: the
    16 bytes read are [fields of lanes 4c, 4c+1 (c = 0..3): 6 bytes][2 other][lanes 4c+2, 4c+3: 6 bytes][2 other],
    so that each 64-bit half of every 128-bit chunk holds the fields of its own two lanes."""
    c, r = divmod(lane, 4)
    return 6 * (2 * c + r % 2)


_Q3K_CTRL = [((q3k_scale_bit(i // 4) - 2) % 64) if i % 4 == 1 else 0 for i in range(64)]
_Q3K_KEEP = [i % 4 < 2 for i in range(64)]


@intrinsic
def load_q3k_scales(typingctx, arr, idx):
    """16 six-bit two's-complement fields from the 16 bytes at element `idx` (layout: `q3k_scale_bit`) -> i32 lanes,
    low word = the field sign-extended, high word 0 (the scale operand of a `vpdpwssd`). AVX-512 VBMI: the bytes
    broadcast to every 128-bit chunk, one zero-masking `vpmultishiftqb` puts each field in bits 2..7 of its lane's
    byte 1, one `vpsraw` by 10 sign-extends it and drops the neighbours' bits below; bytes 2, 3 are masked to 0."""
    if not _HAS_VBMI:
        return None

    def codegen(context, builder, sig, args):
        v = _load(builder, _ptr_at(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                  ir.VectorType(_I8, 16))
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VB, [_VB, _VB]),
                                           "llvm.x86.avx512.pmultishift.qb.512")
        m = builder.call(f, [_const_vec(_I8, _Q3K_CTRL), _shuffle(builder, v, list(range(16)) * 4)])
        m = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), 64), _Q3K_KEEP), m, ir.Constant(_VB, None))
        w16 = ir.VectorType(ir.IntType(16), 32)
        return builder.bitcast(builder.ashr(builder.bitcast(m, w16), _const_vec(ir.IntType(16), [10] * 32)), _VI)
    return I512(arr, idx), codegen
