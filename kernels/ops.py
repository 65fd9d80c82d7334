"""The non-matmul operations of the LLaMA forward pass, as llama.cpp computes them (docs: engine.md section 4).

RMSNorm, RoPE ("normal" mode 0: adjacent pairs, with frequency base and scale), causal grouped-query attention over
an fp16 KV cache, softmax, SwiGLU. Activations are float32 C-contiguous arrays; the KV cache holds fp16 bit
patterns as uint16 (2 bytes per value, like llama.cpp's default F16 cache), head-major, converted to float32 in
registers (`f16_to_f32`).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from airobackend.kernels import JIT, JIT_PARALLEL


@njit(**JIT_PARALLEL)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x, out float32 [n_tok, n]; sum of squares in float64."""
    n = x.shape[1]
    for t in prange(x.shape[0]):
        xt = x[t]
        ss = 0.0
        for i in range(n):
            ss += np.float64(xt[i]) * np.float64(xt[i])
        scale = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = xt[i] * scale * weight[i]


@njit(**JIT)
def rope(x, pos, n_rot, freq_base, freq_scale):
    """In-place RoPE, llama.cpp mode 0, on x float32 [n_tok, n_heads, head_dim] at integer positions pos [n_tok].

    Pair (x[2i], x[2i+1]) of the first n_rot dims is rotated by theta_i = freq_scale * p * freq_base^(-2i/n_rot).
    """
    n_tok, n_heads = x.shape[0], x.shape[1]
    half = n_rot // 2
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for t in range(n_tok):
        p = freq_scale * np.float64(pos[t])
        for i in range(half):
            theta = p * freq_base ** (-2.0 * i / n_rot)
            cos[i] = math.cos(theta)
            sin[i] = math.sin(theta)
        for h in range(n_heads):
            v = x[t, h]
            for i in range(half):
                x0, x1 = v[2 * i], v[2 * i + 1]
                v[2 * i] = x0 * cos[i] - x1 * sin[i]
                v[2 * i + 1] = x0 * sin[i] + x1 * cos[i]


@njit(**JIT)
def round_f16(a):
    """Round float32 values in place to the nearest fp16 value (ties to even), as ggml does before F16 dot products.

    Normal fp16 range: keep 10 mantissa bits; below 2^-14 (fp16 subnormals): round to a multiple of 2^-24;
    from 65520 on: infinity. NaN stays NaN.
    """
    u = a.view(np.uint32)
    for i in range(a.shape[0]):
        bits = np.int64(u[i])
        mag = bits & 0x7FFFFFFF
        if mag > 0x7F800000:
            continue
        if mag >= 0x477FF000:
            u[i] = np.uint32((bits & 0x80000000) | 0x7F800000)
        elif mag >= 0x38800000:
            bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
            u[i] = np.uint32(bits)
        else:
            a[i] = np.float32(np.rint(np.float64(a[i]) * 16777216.0) / 16777216.0)


@njit(**JIT)
def softmax(s):
    """In place: s = exp(s - max) / sum, sum in float64 (ggml_vec_soft_max)."""
    m = -np.inf
    for j in range(s.shape[0]):
        m = max(m, s[j])
    total = 0.0
    for j in range(s.shape[0]):
        e = np.float32(math.exp(s[j] - m))
        s[j] = e
        total += e
    inv = np.float32(1.0 / total)
    for j in range(s.shape[0]):
        s[j] *= inv


@njit(**JIT)
def f16_to_f32(h):
    """The fp16 bit pattern h as float32, in arithmetic that vectorizes (no table gather).

    Sign, exponent and mantissa moved into float32 position, times 2^112 (the exponent bias difference): exact for
    normal and subnormal halves. (fp16 inf/NaN, which a KV cache never holds, would come out finite.)
    """
    h = np.int32(h)
    bits = np.uint32(((h & 0x7FFF) << 13) | ((h & 0x8000) << 16))
    return bits.view(np.float32) * np.float32(5.192296858534828e33)


@njit(**JIT_PARALLEL)
def attention(q, k_cache, v_cache, n_past, out):
    """Causal grouped-query attention for n_tok new tokens at positions n_past .. n_past+n_tok-1.

    q: float32 [n_tok, n_head, head_dim] (already roped); k_cache, v_cache: uint16 (fp16 bits) [n_head_kv, n_ctx,
    head_dim] holding positions 0 .. n_past+n_tok-1 (head-major, so one head's keys stream contiguously);
    out: float32 [n_tok, n_head * head_dim].
    Query head h reads kv head h // (n_head / n_head_kv). As llama.cpp with an F16 cache: q and the softmax row are
    rounded to fp16 before their dot products; scores are scaled by 1/sqrt(head_dim) after the dot product.
    """
    n_tok, n_head, head_dim = q.shape
    n_gqa = n_head // k_cache.shape[0]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for th in prange(n_tok * n_head):
        t, h = th // n_head, th % n_head
        n_kv = n_past + t + 1                          # causal: position n_past+t sees 0 .. n_past+t
        kh, vh = k_cache[h // n_gqa], v_cache[h // n_gqa]   # [n_ctx, head_dim] of this query head's kv head
        qh = q[t, h].copy()
        round_f16(qh)
        s = np.empty(n_kv, np.float32)
        for j in range(n_kv):
            kj = kh[j]
            acc = np.float32(0.0)
            for d in range(head_dim):
                acc += qh[d] * f16_to_f32(kj[d])
            s[j] = acc * scale
        softmax(s)
        round_f16(s)
        o = out[t, h * head_dim:(h + 1) * head_dim]
        o[:] = 0.0
        for j in range(n_kv):
            vj = vh[j]
            p = s[j]
            for d in range(head_dim):
                o[d] += p * f16_to_f32(vj[d])


@njit(**JIT_PARALLEL)
def silu_mul(gate, up):
    """SwiGLU in place: gate = silu(gate) * up, silu(z) = z / (1 + exp(-z)); float32 [n_tok, n_ff]."""
    for t in prange(gate.shape[0]):
        g, u = gate[t], up[t]
        for i in range(g.shape[0]):
            z = g[i]
            g[i] = z / (np.float32(1.0) + np.exp(-z)) * u[i]


@njit(**JIT_PARALLEL)
def add(x, y):
    """In place x += y (residual connections), float32 [n_tok, n]."""
    for t in prange(x.shape[0]):
        xt, yt = x[t], y[t]
        for i in range(xt.shape[0]):
            xt[i] += yt[i]


def f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bit patterns as uint16 (round to nearest even), for writing the KV cache."""
    return x.astype(np.float16).view(np.uint16)
