"""Quantized KV cache rows (q8_0, q4_0) and the attention that reads them: Numba kernels vs the numpy definitions in
kernels/kvquant.py, and the quantizers vs gguf-py's independent ones."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from airobackend.kernels import kvquant as K
from airobackend.kernels import simd

TYPES = [K.Q8_0, K.Q4_0, K.F16]


def awkward_rows(rng, shape):
    """Random rows with the blocks that trip quantizers: all zero, +a and -a both the largest, a huge and a tiny
    scale (fp16 subnormal d), one large outlier."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    flat = x.reshape(-1, 32)
    flat[0] = 0.0
    flat[1, 3], flat[1, 9] = 5.0, -5.0
    flat[2, 7], flat[2, 1] = -7.5, 7.5
    flat[3] *= 1e3
    flat[4] *= 1e-6
    flat[5, 11] = 400.0
    return x


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("hd", [32, 64, 128, 160])
def test_stored_rows_are_the_numpy_definition_bit_for_bit(t, hd):
    rng = np.random.default_rng(hd + t)
    x = awkward_rows(rng, (7, 3, hd))
    want = K.quantize_ref(x, t)
    assert want.shape == (7, 3, K.row_bytes(t, hd))
    cache = np.full((3, 12, K.row_bytes(t, hd)), 0xA5, np.uint8)
    K.store_rows(x, cache, 2, t)
    np.testing.assert_array_equal(cache[:, 2:9].transpose(1, 0, 2), want)
    assert (cache[:, :2] == 0xA5).all() and (cache[:, 9:] == 0xA5).all()        # nothing else is written
    rows = np.zeros((21, K.row_bytes(t, hd)), np.uint8)
    for i, r in enumerate(x.reshape(-1, hd)):                                   # the portable (no SIMD) kernel
        K.quantize_row(r, t, rows[i])
    np.testing.assert_array_equal(rows, want.reshape(21, -1))
    back = np.empty((21, hd), np.float32)
    K.dequantize_rows(want.reshape(21, -1), t, back)
    np.testing.assert_array_equal(back, K.dequantize_ref(want, t, hd).reshape(21, hd))


def test_row_sizes_are_ggmls():
    # ggml: block_q8_0 = fp16 d + 32 int8 (34 bytes), block_q4_0 = fp16 d + 16 bytes (18); f16 2 bytes a value
    assert [K.row_bytes(t, 128) for t in (K.F16, K.Q8_0, K.Q4_0)] == [256, 4 * 34, 4 * 18]
    with pytest.raises(ValueError, match="multiple of 32"):
        K.row_bytes(K.Q8_0, 80)


def _to_ggml_blocks(rows, t, hd):
    """Our rows [n, row_bytes] as ggml's blocks [n * hd/32, d then quants] (the scales moved back in front)."""
    qb, nb = (hd if t == K.Q8_0 else hd // 2), hd // 32
    qs = rows[:, :qb].reshape(-1, nb, qb // nb)
    d = rows[:, qb:].reshape(-1, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(-1, 2 + qb // nb)


@pytest.mark.parametrize("t,name", [(K.Q4_0, "Q4_0"), (K.Q8_0, "Q8_0")])
def test_quantizers_agree_with_gguf_py(t, name):
    rng = np.random.default_rng(7)
    x = awkward_rows(rng, (64, 128))
    ours = _to_ggml_blocks(K.quantize_ref(x, t), t, 128)
    theirs = quants.quantize(x, getattr(GGMLQuantizationType, name)).reshape(ours.shape)
    np.testing.assert_array_equal(ours[:, :2], theirs[:, :2])                  # the fp16 scales
    if t == K.Q4_0:                                  # ggml-cpu stores q4_0 with the reference quantizer: identical
        np.testing.assert_array_equal(ours, theirs)
    else:                                            # gguf-py has ggml's portable q8_0 (round half away, x * 1/d);
        qa, qb = ours[:, 2:].view(np.int8), theirs[:, 2:].view(np.int8)  # the x86 cache store rounds half to even
        assert np.abs(qa.astype(int) - qb).max() <= 1 and (qa != qb).mean() < 1e-3


def test_f16_bits_helper_rounds_like_numpy():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
                        [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 6.1e-5, 5.96e-8, 2.98e-8, 1e-12]])
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = np.array([K._f16_bits(v) for v in x], np.uint16)
    np.testing.assert_array_equal(got, want)


KERNELS = ["attention_rows"] + (["attention_simd"] if simd.ISA != "none" else [])
PAIRS = [(K.Q8_0, K.Q8_0), (K.Q4_0, K.Q4_0), (K.F16, K.Q8_0), (K.Q8_0, K.F16), (K.Q4_0, K.F16), (K.F16, K.Q4_0)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tk,tv", PAIRS)
@pytest.mark.parametrize("n_head,n_head_kv,n_past,n_tok,hd", [
    (4, 2, 9, 1, 32), (2, 1, 3, 5, 64), (2, 1, 5, 3, 160),
    # head_dim 128: decode, a partial tile, the transposed tile (>= 8 tokens: odd, two tiles), GQA
    (2, 2, 40, 1, 128), (4, 2, 17, 5, 128), (4, 4, 30, 9, 128), (4, 2, 0, 37, 128)])
def test_attention_matches_the_definition(kernel, tk, tv, n_head, n_head_kv, n_past, n_tok, hd):
    rng = np.random.default_rng(n_head * 1000 + n_past * 10 + n_tok)
    n_kv = n_past + n_tok
    q = (rng.standard_normal((n_tok, n_head, hd)) * 1.5).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    # rows past n_kv hold bytes that decode to huge values: a read beyond the causal limit shows
    kc = np.full((n_head_kv, n_kv + 3, K.row_bytes(tk, hd)), 0x7B, np.uint8)
    vc = np.full((n_head_kv, n_kv + 3, K.row_bytes(tv, hd)), 0x7B, np.uint8)
    K.store_rows(k, kc, 0, tk)
    K.store_rows(v, vc, 0, tv)
    want = K.attention_ref(q, kc[:, :n_kv].transpose(1, 0, 2), vc[:, :n_kv].transpose(1, 0, 2), n_past, tk, tv)
    out = np.full((n_tok, n_head * hd), np.nan, np.float32)
    getattr(K, kernel)(q, kc, vc, n_past, out, tk, tv)
    # the quantization steps are the same numbers in both; what is left is float32 summation order and ggml's exp
    np.testing.assert_allclose(out, want.reshape(n_tok, -1), rtol=0, atol=3e-6)


def test_quantized_attention_moves_results_by_the_quantization_error_only():
    # the same keys/values through an f16 cache and a q8_0 / q4_0 one: close to each other, and the definition is
    # sensitive enough to tell a wrong q conversion (fp16 q against q8_0 keys) apart
    rng = np.random.default_rng(11)
    q = rng.standard_normal((3, 4, 128)).astype(np.float32)
    k, v = rng.standard_normal((2, 20, 2, 128)).astype(np.float32)
    rows = {t: (K.quantize_ref(k, t), K.quantize_ref(v, t)) for t in TYPES}
    f16 = K.attention_ref(q, *rows[K.F16], 17, K.F16, K.F16)
    for t, bound in ((K.Q8_0, 0.02), (K.Q4_0, 0.2)):
        got = np.empty((3, 4 * 128), np.float32)
        K.attention(q, *(c.transpose(1, 0, 2).copy() for c in rows[t]), 17, got, t, t)
        err = np.abs(got - f16.reshape(3, -1)).max()
        assert 1e-4 < err < bound, err
    kq = rows[K.Q8_0][0]
    wrong = K.attention_ref(q, K.quantize_ref(K.dequantize_ref(kq, K.Q8_0, 128), K.F16), rows[K.Q8_0][1], 17,
                            K.F16, K.Q8_0)       # the same keys, but q rounded to fp16 instead of quantized
    right = K.attention_ref(q, kq, rows[K.Q8_0][1], 17, K.Q8_0, K.Q8_0)
    assert np.abs(wrong - right).max() > 1e-4


_AVX2_SCRIPT = r"""
import numpy as np
from airobackend.kernels import kvquant as K, simd
assert simd.ISA == "avx2", simd.ISA
rng = np.random.default_rng(5)
for tk, tv in [(K.Q8_0, K.Q8_0), (K.Q4_0, K.Q4_0), (K.F16, K.Q4_0)]:
    for n_tok, n_past, hd in [(1, 40, 128), (9, 7, 128), (3, 5, 160)]:
        q = rng.standard_normal((n_tok, 4, hd)).astype(np.float32)
        x = rng.standard_normal((2, n_past + n_tok, 2, hd)).astype(np.float32)
        kc, vc = (np.zeros((2, 80, K.row_bytes(t, hd)), np.uint8) for t in (tk, tv))
        K.store_rows(x[0], kc, 0, tk)
        K.store_rows(x[1], vc, 0, tv)
        assert np.array_equal(kc[:, :n_past + n_tok].transpose(1, 0, 2), K.quantize_ref(x[0], tk))
        a, b = np.empty((n_tok, 4 * hd), np.float32), np.empty((n_tok, 4 * hd), np.float32)
        K.attention_simd(q, kc, vc, n_past, a, tk, tv)
        K.attention_rows(q, kc, vc, n_past, b, tk, tv)
        assert np.abs(a - b).max() < 3e-6, np.abs(a - b).max()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(simd.detect_isa("avx2") != "avx2", reason="CPU lacks AVX2")
def test_avx2_build():
    # dpbusd is vpmaddubsw + vpmaddwd there: its 16-bit pair sums must not saturate (q4_0 nibbles <= 15; q8_0 keys
    # go through dot_s8s8, whose unsigned side is |q| <= 127)
    env = dict(os.environ, AIRO_SIMD="avx2", NUMBA_CPU_NAME="haswell")
    r = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
