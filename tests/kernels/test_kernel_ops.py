"""RMSNorm, RoPE, attention over the fp16 KV cache, softmax, SwiGLU, fp16 rounding: Numba kernels vs numpy."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kernels import ops, reference, simd
from airobackend.kernels.dequant import f16_table


def test_rmsnorm():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 259)) * 3).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(259)).astype(np.float32)
    w.setflags(write=False)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, 5e-6, out)
    np.testing.assert_allclose(out, reference.rmsnorm(x, w, 5e-6), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (500000.0, 1.0), (10000.0, 0.25)])
@pytest.mark.parametrize("head_dim", [32, 128])
def test_rope_normal_mode(base, scale, head_dim):
    rng = np.random.default_rng(head_dim)
    x = rng.standard_normal((4, 3, head_dim)).astype(np.float32)
    pos = np.array([0, 1, 17, 2047], np.int64)
    ours = x.copy()
    ops.rope(ours, pos, head_dim, base, scale)
    np.testing.assert_allclose(ours, reference.rope(x, pos, base, scale), rtol=1e-5, atol=2e-5)
    # position 0 is the identity; pairs are adjacent (x[2i], x[2i+1]): their norms are preserved
    np.testing.assert_array_equal(ours[0], x[0])
    pair_norm = lambda a: a[..., 0::2] ** 2 + a[..., 1::2] ** 2  # noqa: E731
    np.testing.assert_allclose(pair_norm(ours), pair_norm(x), rtol=1e-5, atol=1e-6)


def test_rope_frequency_factors():
    """rope_freqs divides each pair's angle: against the reference, and all factors 2 == linear scaling by 1/2."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    pos = np.array([1, 100, 4000], np.int64)
    ff = np.linspace(1.0, 8.0, 32).astype(np.float32)
    ours = x.copy()
    ops.rope(ours, pos, 64, 500000.0, 1.0, ff)
    np.testing.assert_allclose(ours, reference.rope(x, pos, 500000.0, 1.0, ff), rtol=1e-5, atol=2e-5)
    halved, scaled = x.copy(), x.copy()
    ops.rope(halved, pos, 64, 10000.0, 1.0, np.full(32, 2.0, np.float32))
    ops.rope(scaled, pos, 64, 10000.0, 0.5)
    np.testing.assert_array_equal(halved, scaled)
    assert not np.array_equal(ours, reference.rope(x, pos, 500000.0, 1.0))


def test_rope_by_delta_composes():
    """Rotating by p then by -n equals rotating by p - n (what the context shift relies on)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 64)).astype(np.float32)
    a = x.copy()
    ops.rope(a, np.array([30, 40]), 64, 10000.0, 1.0)
    ops.rope(a, np.array([-7, -7]), 64, 10000.0, 1.0)
    b = x.copy()
    ops.rope(b, np.array([23, 33]), 64, 10000.0, 1.0)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_round_f16_equals_numpy_half():
    rng = np.random.default_rng(1)
    vals = np.concatenate([rng.standard_normal(5000) * s for s in (1e-7, 1e-5, 1e-3, 1, 100, 6e4)])
    vals = np.concatenate([vals, [0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 1 + 2.0 ** -11,
                                  65504.0, 65519.0, 65520.0, -1e6, np.inf, -np.inf, np.nan]])
    a = vals.astype(np.float32)
    ours = a.copy()
    ops.round_f16(ours)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(ours, a.astype(np.float16).astype(np.float32))


def test_f16_to_f32_every_finite_half():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    ours = np.array([ops.f16_to_f32(b) for b in bits[finite][::7]], np.float32)   # scalar helper, any half
    np.testing.assert_array_equal(ours, bits[finite][::7].view(np.float16).astype(np.float32))


def test_softmax_and_silu_mul():
    rng = np.random.default_rng(2)
    s = (rng.standard_normal(77) * 4).astype(np.float32)
    ours = s.copy()
    ops.softmax(ours)
    np.testing.assert_allclose(ours, reference.softmax(s.astype(np.float64)), rtol=1e-6)
    g = (rng.standard_normal((2, 301)) * 5).astype(np.float32)
    u = rng.standard_normal((2, 301)).astype(np.float32)
    ours = g.copy()
    ops.silu_mul(ours, u)
    np.testing.assert_allclose(ours, reference.silu_mul(g, u), rtol=1e-6, atol=1e-7)
    # a row width the SIMD kernel takes (n_ff of LLaMA 7B), with saturating inputs
    g = (rng.standard_normal((3, 11008)) * 8).astype(np.float32)
    g[0, :6] = [100.0, -100.0, 0.0, 88.5, -88.5, 1e-30]
    u = rng.standard_normal((3, 11008)).astype(np.float32)
    ours = g.copy()
    ops.silu_mul(ours, u)
    np.testing.assert_allclose(ours, reference.silu_mul(g, u), rtol=1e-6, atol=1e-7)


ATTENTION_KERNELS = ["attention", "attention_rows", "attention_tiled"] + (
    ["attention_simd"] if simd.ISA != "none" else [])


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("n_head,n_head_kv,n_past,n_tok,hd", [
    (4, 4, 0, 5, 32), (8, 2, 9, 1, 32), (8, 2, 3, 4, 32), (6, 1, 0, 1, 32),
    # head_dim 128 (LLaMA): the simd kernel's transposed tile (>= 8 tokens), odd and partial tiles, GQA, decode
    (4, 2, 17, 37, 128), (2, 1, 0, 9, 128), (4, 4, 30, 16, 128), (4, 4, 40, 1, 128), (2, 2, 5, 3, 128)])
def test_attention_gqa_causal(kernel, n_head, n_head_kv, n_past, n_tok, hd):
    rng = np.random.default_rng(n_head * 100 + n_past)
    n_ctx = n_past + n_tok + 3
    n_kv = n_past + n_tok
    q = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    k_cache = np.full((n_head_kv, n_ctx, hd), 0x7BFF, np.uint16)     # 65504 beyond n_kv: must never be read
    v_cache = k_cache.copy()
    k_cache[:, :n_kv] = ops.f32_to_f16_bits(k.transpose(1, 0, 2))
    v_cache[:, :n_kv] = ops.f32_to_f16_bits(v.transpose(1, 0, 2))
    out = np.empty((n_tok, n_head * hd), np.float32)
    getattr(ops, kernel)(q, k_cache, v_cache, n_past, out)
    tab = f16_table()
    kf, vf = tab[k_cache[:, :n_kv]].transpose(1, 0, 2), tab[v_cache[:, :n_kv]].transpose(1, 0, 2)
    # ours rounds q and the probabilities to fp16 like llama.cpp's F16 cache path
    expect = reference.attention(q, kf, vf, n_past, f16_round=True)
    # A float32 exp (the simd kernel's is ggml_v_expf's polynomial, ~2 ulp) may round a probability to the fp16
    # neighbour of the float64 reference's: 2^-11 of one term p*v of the sum, ~1e-3 with 128-wide heads' peaky
    # softmax. Masking or scaling mistakes are off by 1e-1 and more.
    exact = hd == 32 and (kernel in ("attention_rows", "attention_tiled") or simd.ISA == "none")
    atol = 2e-5 if exact else 2e-3
    np.testing.assert_allclose(out, expect.reshape(n_tok, -1), atol=atol, rtol=0)
    assert np.abs(out - reference.attention(q, kf, vf, n_past).reshape(n_tok, -1)).max() < 3e-3
    assert np.isfinite(out).all()


@pytest.mark.parametrize("hd", [32, 24])
def test_store_kv_writes_fp16_bits_in_place(hd):
    # the forward pass writes new keys/values straight into the fp16 cache; other positions stay untouched
    rng = np.random.default_rng(hd)
    x = (rng.standard_normal((5, 3, hd)) * 4).astype(np.float32)
    x[0, 0, :3] = [70000.0, 1e-7, -0.0]
    cache = np.full((3, 12, hd), 0x1234, np.uint16)
    ops.store_kv(x, cache, 6)
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16).view(np.uint16).transpose(1, 0, 2)
    np.testing.assert_array_equal(cache[:, 6:11], expect)
    assert (cache[:, :6] == 0x1234).all() and (cache[:, 11:] == 0x1234).all()


# ------------------------------------------------------------------------------------------------ fused / one-token
# The forward pass calls fused ops (add_rmsnorm, rope_kv) and one-token forms that run on the calling thread; each
# must give exactly what the separate batch ops give.
@pytest.mark.parametrize("n", [1, 3])
def test_add_rmsnorm_is_add_then_rmsnorm(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 512)) * 3).astype(np.float32)
    y = rng.standard_normal((n, 512)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(512)).astype(np.float32)
    x1, out1 = x.copy(), np.full_like(x, np.nan)
    ops.add_rmsnorm(x1, y, w, 1e-5, out1)
    x2, out2 = x + y, np.empty_like(x)
    ops.rmsnorm(x2, w, 1e-5, out2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_allclose(out1, reference.rmsnorm(x + y, w, 1e-5), rtol=2e-6, atol=1e-7)


def test_one_token_forms_equal_the_batch_rows():
    """A one-token call (serial path) gives row for row what the same row gets inside a batch (prange path)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 1024)) * 2).astype(np.float32)
    y = rng.standard_normal((3, 1024)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(1024)).astype(np.float32)
    batch = np.empty_like(x)
    ops.rmsnorm(x, w, 1e-6, batch)
    xb = x.copy()
    ops.add(xb, y)
    gb, ub = x.copy(), y.copy()
    ops.silu_mul(gb, ub)
    for t in range(3):
        one = np.empty((1, 1024), np.float32)
        ops.rmsnorm(x[t:t + 1], w, 1e-6, one)
        np.testing.assert_array_equal(one[0], batch[t])
        xt = x[t:t + 1].copy()
        ops.add(xt, y[t:t + 1])
        np.testing.assert_array_equal(xt[0], xb[t])
        g1 = x[t:t + 1].copy()
        ops.silu_mul(g1, y[t:t + 1].copy())
        np.testing.assert_array_equal(g1[0], gb[t])


@pytest.mark.parametrize("hd,n_kv,n_past", [(128, 8, 0), (64, 2, 4), (24, 1, 4)])   # 24: the separate-call path
def test_rope_kv_is_rope_then_store(hd, n_kv, n_past):
    rng = np.random.default_rng(hd)
    n, n_head = 3, 2 * n_kv
    q = rng.standard_normal((n, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv, hd)).astype(np.float32)
    pos = np.arange(n_past, n_past + n, dtype=np.int64)
    caches = [np.full((n_kv, 16, hd), 0x1234, np.uint16) for _ in range(4)]
    q1, k1 = q.copy(), k.copy()
    ops.rope_kv(q1, k1, v, pos, hd, 10000.0, 0.5, caches[0], caches[1], n_past)
    q2, k2 = q.copy(), k.copy()
    ops.rope(q2, pos, hd, 10000.0, 0.5)
    ops.rope(k2, pos, hd, 10000.0, 0.5)
    ops.store_kv(k2, caches[2], n_past)
    ops.store_kv(v, caches[3], n_past)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(caches[0], caches[2])
    np.testing.assert_array_equal(caches[1], caches[3])
    assert (caches[0][:, :n_past] == 0x1234).all() and (caches[0][:, n_past + n:] == 0x1234).all()
    assert (caches[1][:, n_past:n_past + n] != 0x1234).all()
