"""Quantized weight matrices: choose a kernel per tensor at load time and multiply activations with it.

`prepare(tensor_info, n_threads)` is called once per 2-D weight tensor. It asks the fast integer kernels
(`airobackend.kernels.fast.prepare_fast`, where that module exists and supports the type on this CPU) for an
object with `.matvec(x, out)` / `.matmat(X, out)`, and otherwise uses the generic float32 kernels of
`kernels/dequant.py` (dequantize each row of the raw blocks, float32 dot products). `kernels="generic"` (or the
environment variable AIRO_KERNELS=generic) forces the generic path; `kernels="fast"` requires the fast one.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from . import dequant
from .ggml_types import BLOCK, WEIGHT_TYPES, GGMLType, UnsupportedType

log = logging.getLogger("airobackend.kernels")

KERNEL_CHOICES = ("auto", "generic", "fast")


class GenericKernel:
    """The portable float32 path: dequantize a row into scratch, dot it with the activations."""

    name = "generic"

    def __init__(self, ggml_type: int, raw2d: np.ndarray, n_rows: int, n_cols: int) -> None:
        self.ggml_type, self.raw2d, self.n_rows, self.n_cols = dequant.TypeId(ggml_type), raw2d, n_rows, n_cols
        self.tab = dequant.f16_table()
        # Enough chunks for the threads to balance, each long enough to amortize its scratch allocation.
        self.rows_per_chunk = max(1, min(32, n_rows // 64))

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        dequant.matvec_f32(self.raw2d, self.ggml_type, x, out, self.tab, self.rows_per_chunk)

    def matmat(self, x: np.ndarray, out: np.ndarray) -> None:
        dequant.matmat_f32(self.raw2d, self.ggml_type, x, out, self.tab, min(self.rows_per_chunk, 16))


class Weight:
    """A weight matrix W [n_rows, n_cols] (ggml ne = [n_cols, n_rows]) ready for `W @ x`.

    Attributes: name, ggml_type, n_rows, n_cols, raw2d (uint8 [n_rows, row_bytes] over the file's blocks),
    kernel (the object doing the products), kernel_name ('generic' or the fast kernel's name), act_key (the
    activation format the kernel quantizes x to, or None).
    """

    def __init__(self, name: str, ggml_type: int, raw2d: np.ndarray, n_rows: int, n_cols: int, kernel: Any) -> None:
        self.name, self.ggml_type, self.raw2d = name, int(ggml_type), raw2d
        self.n_rows, self.n_cols, self.kernel = n_rows, n_cols, kernel
        self.kernel_name = getattr(kernel, "name", "fast")
        # weights with the same act_key (not None) can share one quantization of their input
        self.act_key = getattr(kernel, "act_key", None) if hasattr(kernel, "quantize_input") else None

    def __call__(self, x: np.ndarray, out: Optional[np.ndarray] = None, xq: Any = None) -> np.ndarray:
        """x float32 [n_tok, n_cols] -> float32 [n_tok, n_rows] (mat-vec for one token, mat-mat for more).

        out: where to write (allocated when None). xq: `quantize(x)` of an earlier weight with the same `act_key`,
        so that weights reading one input quantize it once (see `project`)."""
        if out is None:
            out = np.empty((x.shape[0], self.n_rows), np.float32)
        if xq is not None:
            if x.shape[0] == 1:
                self.kernel.matvec_q(xq, out[0])
            else:
                self.kernel.matmat_q(xq, out)
        elif x.shape[0] == 1:
            self.kernel.matvec(x[0], out[0])
        else:
            self.kernel.matmat(x, out)
        return out

    def quantize(self, x: np.ndarray) -> Any:
        """x quantized for this weight's kernel (None for kernels that take float32 x directly)."""
        return self.kernel.quantize_input(x) if self.act_key is not None else None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` as float32 [len(ids), n_cols] (the embedding lookup)."""
        out = np.empty((len(ids), self.n_cols), np.float32)
        dequant.dequant_rows(self.raw2d, dequant.TypeId(self.ggml_type), np.asarray(ids, np.int64), out,
                             dequant.f16_table())
        return out

    def __repr__(self) -> str:
        return (f"Weight({self.name!r}, {GGMLType(self.ggml_type).name}, {self.n_rows}x{self.n_cols}, "
                f"kernel={self.kernel_name})")


def project(x: np.ndarray, *weights: Weight, outs: Optional[list] = None) -> list:
    """[w(x) for w in weights], quantizing x once per distinct activation format (wq/wk/wv, w1/w3 share an input).

    outs: optional output arrays (one per weight, float32 [n_tok, w.n_rows]) to write into instead of allocating.
    One token is quantized inside each weight's own mat-vec call instead: with the SIMD quantizers that costs less
    than a separate call, which is slow after a weight stream has evicted the caches."""
    shared: dict = {}
    res = []
    for i, w in enumerate(weights):
        xq = None
        if w.act_key is not None and x.shape[0] > 1:
            xq = shared.get(w.act_key)
            if xq is None:
                xq = shared[w.act_key] = w.quantize(x)
        res.append(w(x, None if outs is None else outs[i], xq))
    return res


def _fast_module():
    try:
        from . import fast      # here, and optional: without it (ImportError) the generic kernels serve
    except ImportError:
        return None
    return fast


def prepare(tensor_info: Any, n_threads: int = 0, kernels: Optional[str] = None) -> Weight:
    """Wrap a 2-D weight tensor (a formats TensorInfo) for matrix products; called once per tensor at load.

    Args:
        tensor_info: has .name, .type (GGMLType), .ne (ggml order: ne[0] = row length) and .data (raw uint8 bytes).
        n_threads: the thread count the model will run with (passed on to the fast kernels' planning).
        kernels: 'auto' (fast where available, else generic), 'generic' or 'fast'; None reads AIRO_KERNELS
            (default 'auto').
    """
    choice = kernels or os.environ.get("AIRO_KERNELS", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    t = GGMLType(int(tensor_info.type))
    if t not in WEIGHT_TYPES:
        raise UnsupportedType(f"tensor type {t.name} cannot be used as a weight", tensor=tensor_info.name)
    ne = tuple(int(n) for n in tensor_info.ne)
    n_cols = ne[0]
    n_rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    per_block, _ = BLOCK[t]
    if n_cols % per_block:
        raise UnsupportedType(f"row length {n_cols} is not a multiple of the {t.name} block size {per_block}",
                                    tensor=tensor_info.name)
    raw2d = dequant.as_rows(tensor_info.data, t, n_rows, n_cols)
    kernel = None
    if choice != "generic":
        fast = _fast_module()
        if fast is not None:
            kernel = fast.prepare_fast(t, raw2d, n_rows, n_cols)
        if kernel is None and choice == "fast":
            raise UnsupportedType(f"no fast kernel for {t.name} on this machine", tensor=tensor_info.name)
    if kernel is None:
        kernel = GenericKernel(t, raw2d, n_rows, n_cols)
    return Weight(tensor_info.name, t, raw2d, n_rows, n_cols, kernel)
