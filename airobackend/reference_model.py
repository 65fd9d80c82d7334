"""The LLaMA forward pass in plain numpy, read top to bottom: what `model.py` computes with kernels, without them.

For reading and for the tests, never for serving: every weight is dequantized to float32 up front and each op is the
numpy oracle of kernels/reference.py, written as llama.cpp computes it (`llama_build_graph` in `llama.cpp` at
dadbed9): RMSNorm, "normal" RoPE on adjacent pairs, causal grouped-query attention over an fp16 KV cache, SwiGLU.

    mf = open_model("model.gguf")                        # airobackend.formats
    logits = forward(load_weights(mf), mf.hparams, [1, 450, 439])     # float32 [3, n_vocab], positions 0..2
"""
from __future__ import annotations

import numpy as np

from airobackend.kernels import reference as ref


def load_weights(mf) -> dict[str, np.ndarray]:
    """Every tensor of an open model file as float32, 2-D tensors as [rows, row_len] (numpy order)."""
    w = {}
    for name, t in mf.tensors.items():
        ne = [int(n) for n in t.ne]
        w[name] = ref.dequantize(t.data, t.type, int(np.prod(ne))).reshape(ne[::-1])
    return w


def forward(w: dict[str, np.ndarray], hp, tokens) -> np.ndarray:
    """Logits [n, n_vocab] of `tokens` at positions 0..n-1 of an empty context."""
    n, d, n_head = len(tokens), int(hp.n_embd), int(hp.n_head)
    hd, eps, pos = d // n_head, float(hp.rms_norm_eps), np.arange(len(tokens))
    rope = lambda t, heads: ref.rope(t.reshape(n, heads, hd), pos, hp.rope_freq_base, hp.rope_freq_scale or 1.0)
    f16 = lambda t: t.astype(np.float16).astype(np.float32)         # what the fp16 KV cache keeps
    x = w["token_embd.weight"][np.asarray(tokens)]                   # [n, d]
    for i in range(int(hp.n_layer)):
        W = lambda s: w[f"blk.{i}.{s}.weight"]
        n_kv = W("attn_k").shape[0] // hd                           # fewer K/V heads than query heads with GQA
        h = ref.rmsnorm(x, W("attn_norm"), eps)
        q, k, v = rope(h @ W("attn_q").T, n_head), rope(h @ W("attn_k").T, n_kv), h @ W("attn_v").T
        a = ref.attention(q, f16(k), f16(v.reshape(n, n_kv, hd)), 0, f16_round=True)
        x = x + a.reshape(n, d) @ W("attn_output").T
        h = ref.rmsnorm(x, W("ffn_norm"), eps)
        x = x + ref.silu_mul(h @ W("ffn_gate").T, h @ W("ffn_up").T) @ W("ffn_down").T
    x = ref.rmsnorm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T
