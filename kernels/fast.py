"""Fast quantized mat-vec / mat-mat kernels: int8 dot products as llama.cpp's CPU path does them.

Entry point: `prepare_fast(ggml_type, raw2d, n_rows, n_cols)` -> a `FastWeight` with `.matvec(x, out)` and
`.matmat(X, out)`, or None when this CPU or this type has no fast kernel (the generic f32 kernels are used then).

How it works, and which module owns each part:
* kernels/specs.py: per weight type, the code fragments of its kernel. The activation row is quantized the way
  llama.cpp does it (kernels/q8.py: Q8_0 / Q8_1 for the legacy types, Q8_K for the k-quants, fp16 rounding for F16
  weights), in a byte order chosen so that one 64-byte load of weight quants meets one 64-byte load of activation
  quants. Inner products run on integers with `vpdpbusd` / `vpmaddubsw`+`vpdpwssd` (AVX-512 VNNI) or
  `vpmaddubsw`+`vpmaddwd` (AVX2), emitted through llvmlite (kernels/simd.py); block scales are applied in float once
  per 128/256 weights (per 512 for q4_0 rows in wide 16-block groups, specs.Q4_0W, one block per i32 lane).
* kernels/codegen.py: the generator that unrolls those fragments into one module per type and instruction set,
  written under the user cache folder and imported from there (`airobackend kernels --dump DIR` writes them out).
* kernels/repack.py: the file's rows in the kernel layout, once at load (the legacy types, q2_K, q3_K, q4_K, q5_K, q6_K;
  F16 is read in place from the mapped file), and the release of the file pages a copy read.
* this module: `FastWeight`, which holds one prepared matrix, quantizes activations into line-aligned buffers and
  calls the generated kernels; `prepare_fast`.

Threads: the kernels are `parallel=True`; the caller sets the count with `numba.set_num_threads`.
"""
from __future__ import annotations

import numba
import numpy as np

from . import q8
from .codegen import kernel_module
from .repack import file_backed, release_pages, to_kernel_layout
from .specs import ISA, Q8K_ARGS, SPECS, WIDE, WIDE_ARGS, WITH_XF, Spec, supported_types, wide_fits

__all__ = ["prepare_fast", "FastWeight", "supported_types", "ISA"]

# Row chunks a thread takes at a time (numba.set_parallel_chunksize around each kernel call: inside the kernel it would
# make Numba refuse to cache it; 0 = Numba's static split into one equal range per thread). Dynamic chunks let a
# thread whose vCPU runs fast take over the work of one that the host slows down.
PAR_CHUNKS = 4
FEW_MAX = 8         # batches of up to this many tokens take the few-token mat-mat (no padding)


_NO_I32 = np.zeros(16, np.int32)
_NO_F32 = np.zeros(16, np.float32)


def empty_lines(shape, dtype, zero: bool = False) -> np.ndarray:
    """np.empty (or zeros) starting on a 64-byte line. The kernels read activations 64 bytes at a time; from a
    buffer 16 or 48 bytes off a line (numpy and Numba allocate on 16 bytes) every such load splits over two lines,
    which measured slower wherever the arithmetic, not the memory, is the limit."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = (np.zeros if zero else np.empty)(n + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    return buf[o:o + n].view(dtype).reshape(shape)


def act1_offsets(spec: Spec, n_steps: int) -> tuple[int, int, int, int]:
    """Byte offsets (oD, oS, oF, oE) of XD, XS, XF and the end in the one-token activation buffer A = [XQ | XD f32 |
    XS i32 | XF f32], each region starting on a 64-byte line. One buffer, quantized and read inside Numba, instead of
    four numpy arrays made in Python per mat-vec: between two weight streams every Python object is out of cache,
    and the four allocations, their views and a second dispatch cost a few per cent of a token there."""
    def line(n: int) -> int:
        return -(-n // 64) * 64
    lay = spec.layout
    if lay == "f16":
        oD = n_steps * 32
        return oD, oD, oD, oD
    nq, nd, ns = n_steps * spec.xq_step, n_steps * spec.xd_step, n_steps * spec.xs_step
    nf = ns if lay in WITH_XF else 0
    oD = line(nq)
    oS = oD + line(4 * nd)
    oF = oS + line(4 * ns)
    return oD, oS, oF, oF + 4 * nf


# bytes of quantized activation per weight column read by the mat-vec (XQ + XD + XS [+ XF])
_ACT_BYTES = {"f16": 2.0, "nib": 176 / 128, "k_sub": 324 / 256, "wide": 640 / 512, "wide128": 640 / 512}
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
        self._mv, self._mm, self._mmf = mod.matvec, mod.matmat, mod.matmat_few
        # weights with equal act_key read the same quantized activations (the legacy types in 4-block groups share
        # the nibble layout with Q8_0 and Q8_1 fields, wide q4_0 has its own; k-quants differ by byte permutation;
        # F16 reads fp16 bytes)
        self.act_key = (spec.layout, n_cols)
        # Software prefetch where the hardware prefetcher loses the weight stream: (1) once the activation row stops
        # fitting L1 beside it (the cliff lies between 15 and 21 KB of activations); (2) for weights read in place
        # from the model file's mapping, whatever its page size: a 4 KB-page page cache, where the hardware
        # prefetchers stop at every page, and the 2 MB-mapped large folios of Linux 6.x on ext4 alike; (3) for the
        # repacked types whose spec says so (Spec.prefetch_short: not q8_0, which measured slower with it). The
        # measurements: bench/results/2026-11-27.md, "Prefetch into L2".
        self._pf = n_cols * _ACT_BYTES[spec.layout] > PF_MIN_ACT or file_backed(W) or spec.prefetch_short
        self._pf_few = self._pf or spec.few_prefetch
        self._a1 = act1_offsets(spec, n_steps)
        self._mvx, self._q1, self._qf = mod.matvec_x, mod.quantize1, mod.quantize_few
        # quantize_few's rows: the one-token layout (F16: the float32 row the mat-mat reads), whole lines apart
        a = (n_steps * 64,) * 4 if spec.layout == "f16" else self._a1
        self._af = (*a, -(-a[3] // 64) * 64)

    # activation buffers for the mat-mat, n tokens padded to n_pad (a multiple of tile_t for the prompt kernel; the
    # few-token kernel takes n_pad = n): (XQ, XD, XS, XF) 2-D, zero-padded rows beyond the real tokens
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
        if lay in WIDE_ARGS:
            XQ = new((n_pad, steps * 512), np.int8)
            XD = new((n_pad, steps * 16), np.float32)
            XS = new((n_pad, steps * 16), np.int32)
            q8.quantize_q8_0_wide_rows(X, WIDE_ARGS[lay], XQ[:n], XD[:n], XS[:n])
            return XQ, steps * 512, XD, steps * 16, XS, _NO_F32, steps * 16
        layout, bmul = Q8K_ARGS[lay]
        XQ = new((n_pad, steps * 256), np.int8)
        XD = new((n_pad, steps), np.float32)
        XS = new((n_pad, steps * 16), np.int32)
        with_f = lay in WITH_XF
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
        if n_tok <= FEW_MAX:
            return self._few_handle(X)
        return self._handle(X, -(-n_tok // self.spec.tile_t) * self.spec.tile_t)

    def _few_handle(self, X: np.ndarray) -> tuple:
        # one Numba call, as quantize1: four aligned numpy buffers made from Python cost ~25 us, several times the
        # quantization of a few rows
        XQ, XD, XS, XF = self._qf(X, *self._af)
        s = self._af[4]
        return (self.act_key, X.shape[0], X.shape[0], XQ, s, XD, s // 4, XS, XF, s // 4)

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
            if n_tok <= FEW_MAX:
                self._mmf(self.W, self.row_bytes, self.n_rows, self.n_steps, XQ, XQS, XD, XDS, XS, XF, XSS,
                          tgt.reshape(-1), n_tok, self._pf_few)
            else:
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
        if X.shape[0] == 1:             # a single token through the mat-mat kernel (the few-token one)
            return self.matmat_q(self._few_handle(np.ascontiguousarray(X, np.float32)), out)
        return self.matmat_q(self.quantize_input(X), out)


def prepare_fast(ggml_type, raw2d: np.ndarray, n_rows: int, n_cols: int) -> FastWeight | None:
    """A FastWeight for this tensor, or None when the CPU lacks AVX2 or the type/shape has no fast kernel.

    raw2d: uint8[n_rows, row_bytes], the tensor's blocks as stored in the file (read-only views are fine; F16
    rows are used in place, the other types are copied once into the kernel layout)."""
    if ISA == "none":
        return None
    spec = SPECS.get(int(ggml_type))
    if spec is None or n_rows <= 0 or n_cols <= 0:
        return None
    if n_cols % spec.block_w or (spec.layout == "f16" and n_cols % 64):
        return None
    n_blk = n_cols // spec.block_w
    row_bytes = n_blk * spec.block_bytes
    wide = WIDE.get(int(ggml_type))
    if wide is not None and wide_fits(wide, n_blk):     # one block per i32 lane (see specs.Q4_0W)
        spec = wide
    raw2d = np.asarray(raw2d)
    if raw2d.dtype != np.uint8 or raw2d.shape != (n_rows, row_bytes):
        raise ValueError(f"raw2d must be uint8[{n_rows}, {row_bytes}] for {spec.name}, got "
                         f"{raw2d.dtype}{list(raw2d.shape)}")
    W = to_kernel_layout(spec, raw2d, n_blk)
    if W is not None:
        release_pages(raw2d)
        return FastWeight(spec, W, W.shape[1], n_rows, n_cols, W.shape[1] // spec.step_bytes)
    W = np.ascontiguousarray(raw2d)
    return FastWeight(spec, W, row_bytes, n_rows, n_cols, n_cols // spec.step_w)
