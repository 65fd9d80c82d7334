"""LlamaModel at 65B / 70B dimensions (one layer): no size assumption anywhere, checked against a plain-numpy
forward pass built from kernels/reference.py. Slow (writes a ~0.5 GB model): run with -m slow."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kernels import reference


def numpy_forward(mf, tokens: np.ndarray) -> np.ndarray:
    """Logits of every position for `tokens` at n_past 0, in float64-ish numpy (reference ops, f16 KV rounding)."""
    hp, t = mf.hparams, mf.tensors

    def w(name):
        info = t[name]
        return reference.dequantize(info.data, info.type, int(np.prod(info.ne))).reshape(info.shape)

    n, hd = len(tokens), hp.n_embd // hp.n_head
    x = w("token_embd.weight")[tokens]
    pos = np.arange(n)
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        h = reference.rmsnorm(x, w(p + "attn_norm.weight"), hp.rms_norm_eps)
        q = reference.rope((h @ w(p + "attn_q.weight").T).reshape(n, hp.n_head, hd), pos, hp.rope_freq_base)
        k = reference.rope((h @ w(p + "attn_k.weight").T).reshape(n, hp.n_head_kv, hd), pos, hp.rope_freq_base)
        v = (h @ w(p + "attn_v.weight").T).reshape(n, hp.n_head_kv, hd)
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)   # F16 cache
        a = reference.attention(q, k, v, 0, f16_round=True).reshape(n, -1)
        x = x + a @ w(p + "attn_output.weight").T
        h = reference.rmsnorm(x, w(p + "ffn_norm.weight"), hp.rms_norm_eps)
        x = x + reference.silu_mul(h @ w(p + "ffn_gate.weight").T, h @ w(p + "ffn_up.weight").T) @ w(
            p + "ffn_down.weight").T
    return reference.rmsnorm(x, w("output_norm.weight"), hp.rms_norm_eps) @ w("output.weight").T


@pytest.mark.slow
@pytest.mark.parametrize("n_head_kv", [64, 8])          # 65B (no GQA) and 70B-style GQA (n_gqa 8)
def test_65b_dimensions_one_layer(tmp_path, n_head_kv):
    from airobackend.formats import open_model
    from airobackend.formats.writer import write_synthetic_model
    from airobackend.model import LlamaModel

    path = tmp_path / "big.gguf"
    write_synthetic_model(path, mix="q4_0", n_vocab=512, n_embd=8192, n_head=64, n_head_kv=n_head_kv, n_layer=1,
                          n_ff=22016, tile_rows=1024)   # 1024 distinct rows: every kv head differs
    tokens = np.array([1, 17, 300, 42, 511], np.int64)
    with open_model(path) as mf:
        model = LlamaModel(mf, n_ctx=16, n_threads=2, kernels="generic")
        assert (model.n_embd, model.n_head, model.n_head_kv, model.layers[0].w1.n_rows) == (8192, 64, n_head_kv, 22016)
        batch = model.eval(tokens, 0, logits_all=True)
        one_by_one = np.concatenate([model.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
        expect = numpy_forward(mf, tokens)
    scale = np.abs(expect).max()
    for ours in (batch, one_by_one):
        err = np.abs(ours - expect).max(axis=1)
        print(f"n_head_kv={n_head_kv}: max|logit| {scale:.3g}, error per position {np.round(err / scale, 7)}")
        # Position 0 attends to itself only (softmax = 1), so it checks every matmul, norm and the FFN tightly.
        assert err[0] <= 2e-5 * scale
        # Later positions: q and the softmax row are rounded to fp16 (as llama.cpp does), and a q value computed
        # a few float32 ulps differently may round to the neighbouring half; with scores of this size that moves
        # logits by up to ~4e-4 of their scale here. A wrong head mapping, rope or mask moves them by O(scale).
        assert err[1:].max() <= 1.5e-3 * scale
