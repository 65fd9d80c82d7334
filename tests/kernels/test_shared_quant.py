"""Activations quantized once and shared by several weights (kernels.matmul.project, FastWeight.matvec_q/matmat_q)
give exactly the products of the one-weight-at-a-time path, for every pair of types that share an activation format."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from airobackend.kernels import fast, matmul
from airobackend.quant import GGMLType as G

sys.path.insert(0, str(Path(__file__).parent))
from blocks import random_blocks  # noqa: E402

pytestmark = pytest.mark.skipif(fast.ISA == "none", reason="no AVX2 / AVX-512 VNNI on this CPU")

N_COLS = 512


def _weight(t: G, n_rows: int, seed: int) -> matmul.Weight:
    raw = random_blocks(t, n_rows, N_COLS, np.random.default_rng(seed))
    info = SimpleNamespace(name=f"w{seed}", type=t, ne=(N_COLS, n_rows), data=raw.reshape(-1))
    return matmul.prepare(info, kernels="fast")


# wq/wk/wv of a q4_K_M file (q4_K, q4_K, q6_K), the legacy types (all one nibble layout), k-quants of one permutation
GROUPS = [(G.Q4_K, G.Q4_K, G.Q6_K), (G.Q4_0, G.Q5_1, G.Q8_0, G.Q4_1), (G.Q2_K, G.Q3_K), (G.F16, G.Q4_K)]


@pytest.mark.parametrize("types", GROUPS, ids=lambda ts: "-".join(t.name for t in ts))
@pytest.mark.parametrize("n_tok", [1, 3, 9])
def test_project_equals_separate_calls(types, n_tok):
    ws = [_weight(t, 64 + 32 * i, i) for i, t in enumerate(types)]
    x = np.random.default_rng(7).standard_normal((n_tok, N_COLS)).astype(np.float32)
    outs = [np.full((n_tok, w.n_rows), np.nan, np.float32) for w in ws]
    got = matmul.project(x, *ws, outs=outs)
    for w, g, o in zip(ws, got, outs):
        assert g is o
        np.testing.assert_array_equal(g, w(x))


def test_handle_of_another_format_is_refused():
    a, b = _weight(G.Q4_K, 32, 1), _weight(G.Q8_0, 32, 2)
    assert a.act_key != b.act_key
    xq = a.quantize(np.ones((1, N_COLS), np.float32))
    with pytest.raises(ValueError):
        b.kernel.matvec_q(xq, np.empty(32, np.float32))


@pytest.mark.parametrize("t", [G.Q4_0, G.Q3_K, G.Q4_K, G.Q6_K, G.F16])
def test_one_token_handle_equals_the_one_call_matvec(t):
    """matvec_q on a one-token handle (quantize_input) and matvec (quantization inside the kernel call) agree."""
    w = _weight(t, 96, 3)
    x = np.random.default_rng(11).standard_normal((1, N_COLS)).astype(np.float32)
    xq = w.quantize(x)
    got = w(x, xq=xq)
    np.testing.assert_array_equal(got, w(x))
    strided64 = np.repeat(x[0].astype(np.float64), 2)[::2]        # converted to contiguous float32 first
    np.testing.assert_array_equal(got[0], w.kernel.matvec(strided64, np.empty(96, np.float32)))
    with pytest.raises(ValueError, match="more than one token"):     # the mat-mat layout differs
        w.kernel.matmat_q(xq, np.empty((1, 96), np.float32))


@pytest.mark.parametrize("shape,dtype", [((1, 700), np.int8), ((4, 33), np.float32), ((3, 16), np.int32), (9, np.int8)])
def test_activation_buffers_start_on_a_cache_line(shape, dtype):
    """The kernels' 64-byte activation loads must not straddle cache lines (see fast.empty_lines)."""
    for zero in (False, True):
        a = fast.empty_lines(shape, dtype, zero=zero)
        assert a.ctypes.data % 64 == 0 and a.shape == np.empty(shape).shape and a.dtype == dtype
        assert a.flags.c_contiguous and (not zero or not a.any())
    w = _weight(G.Q4_K, 32, 5)
    assert w.quantize(np.ones((1, N_COLS), np.float32))[3].ctypes.data % 64 == 0
    handle = w.quantize(np.ones((5, N_COLS), np.float32))
    assert all(a.ctypes.data % 64 == 0 for a in (handle[3], handle[5], handle[7]))
