"""The 16-lane activation quantizers (kernels/q8.py) against the element-by-element references, bit for bit.

The references are the readable definitions (llama.cpp's Q8_0 / Q8_1 / Q8_K rounding, the kernels' byte orders);
the fast kernels' tests check the references' arithmetic against a numpy oracle through whole products
(tests/kernels/test_fast.py). Here every output byte of the vector forms must equal the reference's, on rows built to
hit the corners: ties of +a and -a for Q8_K's signed maximum, all-zero blocks, values that round to +-127 / 128, ties
at .5 (round half to even), fp16 subnormal and overflowing scales, partial groups of the legacy layout.
"""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kernels import fast, q8

pytestmark = pytest.mark.skipif(fast.ISA == "none", reason="no AVX2 / AVX-512 on this CPU (the vector forms are "
                                                            "only used by the fast kernels)")

LAYOUTS = [(q8.LAYOUT_NATURAL, q8.PERM_NATURAL, 1), (q8.LAYOUT_SUB, q8.PERM_SUB, -4)]


def corner_rows(n: int, rng) -> list[np.ndarray]:
    """Rows of length n (a multiple of 256) whose blocks cover the quantizers' corner cases."""
    rows = [rng.standard_normal(n).astype(np.float32) * s for s in (1.0, 1e-3, 300.0)]
    x = rng.standard_normal(n).astype(np.float32)
    for b in range(0, n, 256):                      # per 256-block: a different corner in each
        k = (b // 256) % 6
        blk = x[b:b + 256]
        if k == 0:                                  # +a first, -a later: the first decides the sign
            blk[rng.integers(0, 100)] = 4.0
            blk[rng.integers(150, 256)] = -4.0
        elif k == 1:                                # -a first
            blk[rng.integers(0, 100)] = -4.0
            blk[rng.integers(150, 256)] = 4.0
        elif k == 2:                                # all zero (and negative zero)
            blk[:] = 0.0
            blk[::7] = -0.0
        elif k == 3:                                # exact halves after scaling: x * 127 / amax = m + 0.5
            blk[:] = (rng.integers(-126, 126, 256) + 0.5).astype(np.float32)
            blk[0] = 127.0
        elif k == 4:                                # the maximum negative: -x/mx * 127 rounds to 128, clamped
            blk[:] = rng.uniform(-1, 1, 256).astype(np.float32)
            blk[5] = -1.0
            blk[9] = 1.0 - 2.0 ** -24
        else:                                       # tiny values: fp16 subnormal scales of the 32-blocks
            blk *= np.float32(1e-7)
    rows.append(x)
    big = rng.standard_normal(n).astype(np.float32)
    big[:64] *= np.float32(1e7)                     # amax / 127 beyond fp16's range in the legacy scales
    rows.append(big)
    return rows


@pytest.mark.parametrize("layout,perm,bmul", LAYOUTS)
def test_q8_K_vector_form_equals_reference(layout, perm, bmul):
    rng = np.random.default_rng(7)
    n = 256 * 12
    for x in corner_rows(n, rng):
        outs = []
        for fn, arg in ((q8.quantize_q8_K_ref, perm), (q8.quantize_q8_K, layout)):
            xq = np.full(n, -128, np.int8)
            xd = np.full(n // 256, np.nan, np.float32)
            xb = np.full(n // 16, 12345, np.int32)
            xf = np.full(n // 16, np.nan, np.float32)
            fn(x, arg, bmul, xq, xd, xb, xf)
            outs.append((xq, xd.view(np.int32), xb, xf.view(np.int32)))
        for a, b, name in zip(outs[0], outs[1], ("xq", "xd", "xb", "xf")):
            np.testing.assert_array_equal(a, b, err_msg=f"layout {layout}: {name}")
        assert (outs[0][0] != -128).all()     # every byte written (no quant is -128)


def test_q8_K_without_xf_and_bad_length():
    x = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    xq, xd, xb = np.zeros(512, np.int8), np.zeros(2, np.float32), np.zeros(32, np.int32)
    q8.quantize_q8_K(x, q8.LAYOUT_NATURAL, 1, xq, xd, xb, np.zeros(0, np.float32))
    rq, rd, rb = np.zeros(512, np.int8), np.zeros(2, np.float32), np.zeros(32, np.int32)
    q8.quantize_q8_K_ref(x, q8.PERM_NATURAL, 1, rq, rd, rb, np.zeros(0, np.float32))
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xb, rb)
    with pytest.raises(ValueError, match="multiple of 256"):
        q8.quantize_q8_K(x[:300], q8.LAYOUT_NATURAL, 1, xq, xd, xb, np.zeros(0, np.float32))


@pytest.mark.parametrize("n", [32 * 3, 128, 256 * 3 + 64, 4096])   # partial last group, whole groups
def test_q8_0_nibble_vector_form_equals_reference(n):
    rng = np.random.default_rng(n)
    rows = corner_rows(-(-n // 256) * 256, rng)
    n_grp = -(-n // 128)
    for x in rows:
        x = np.ascontiguousarray(x[:n])
        outs = []
        for fn in (q8.quantize_q8_0_nibble_ref, q8.quantize_q8_0_nibble):
            xq = np.full(n_grp * 128, -128, np.int8)
            xd = np.full(n_grp * 4, np.nan, np.float32)
            xsum = np.full(n_grp * 4, 12345, np.int32)
            xs = np.full(n_grp * 4, np.nan, np.float32)
            fn(x, xq, xd, xsum, xs)
            outs.append((xq, xd.view(np.int32), xsum, xs.view(np.int32)))
        for a, b, name in zip(outs[0], outs[1], ("xq", "xd", "xsum", "xs")):
            np.testing.assert_array_equal(a, b, err_msg=f"n {n}: {name}")
        assert (outs[0][0] != -128).all()     # every byte written (no quant is -128)
    with pytest.raises(ValueError, match="multiple of 32"):
        q8.quantize_q8_0_nibble(np.zeros(40, np.float32), xq, xd, xsum, xs)


@pytest.mark.parametrize("n", [32 * 37, 512, 4096])   # a partial last group of 16 blocks, whole groups
def test_q8_0_wide_is_the_nibble_quantization_in_block_lanes(n):
    # the wide order (q4_0 in 16-block groups): the same quants, d and sums as the nibble order, block j of a group
    # in i32 lane j: xq[512g + 128k + 4j + i] = q[4k + i], + 64: q[16 + 4k + i] of block 16g + j; xsum = -8 sum(q)
    rng = np.random.default_rng(n)
    n_blk, n_grp = n // 32, -(-n // 512)
    for x in corner_rows(-(-n // 256) * 256, rng):
        x = np.ascontiguousarray(x[:n])
        nq = np.zeros(-(-n // 128) * 128, np.int8)
        nd, nsum = np.zeros(n_blk + 3, np.float32), np.zeros(n_blk + 3, np.int32)
        q8.quantize_q8_0_nibble_ref(x, nq, nd, nsum, np.zeros(n_blk + 3, np.float32))
        b = np.arange(n_blk)
        q = np.stack([nq[128 * (b // 4) + 64 * (e // 16) + 16 * (b % 4) + e % 16] for e in range(32)],
                     axis=1)                                # q[block, element]
        xq = np.full(n_grp * 512, -128, np.int8)
        xd = np.full(n_grp * 16, np.nan, np.float32)
        xsum = np.full(n_grp * 16, 12345, np.int32)
        q8.quantize_q8_0_wide(x, -8, xq, xd, xsum)
        want = np.zeros((n_grp * 16, 32), np.int8)
        want[:n_blk] = q
        k, j, i = np.meshgrid(np.arange(4), np.arange(16), np.arange(4), indexing="ij")
        for g in range(n_grp):
            np.testing.assert_array_equal(xq[512 * g + 128 * k + 4 * j + i], want[16 * g + j, 4 * k + i])
            np.testing.assert_array_equal(xq[512 * g + 128 * k + 64 + 4 * j + i], want[16 * g + j, 16 + 4 * k + i])
        np.testing.assert_array_equal(xd[:n_blk].view(np.int32), nd[:n_blk].view(np.int32))
        np.testing.assert_array_equal(xsum[:n_blk], 8 * nsum[:n_blk])
        assert not xd[n_blk:].any() and not xsum[n_blk:].any()
    with pytest.raises(ValueError, match="multiple of 32"):
        q8.quantize_q8_0_wide(np.zeros(40, np.float32), -8, xq, xd, xsum)
