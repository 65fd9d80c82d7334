"""Embeddings: the pooled tensor checked against llama.cpp, pooling and normalisation against numpy, batch = one by
one, the KV cache of a conversation left alone, the Python API (the routes: tests/server/test_server_embeddings.py).

llama.cpp pools "result_norm" (the hidden states after the final norm); its logits are those states times the output
matrix, which has more rows than columns, so least squares on llama.cpp's own teacher-forced logits in
../shared/fixtures gives back llama.cpp's hidden states: the reference the pooled vector is compared with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from airobackend.kernels import reference


def llama_cpp_hidden_states(fixtures_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, llama.cpp's result_norm rows recovered from its logits, the output matrix) for a fixture model."""
    from airobackend.formats import open_model
    ref = np.load(fixtures_dir / "reference" / f"{name}.npz")
    with open_model(str(fixtures_dir / "models" / f"{name}.gguf")) as mf:
        info = mf.tensors["output.weight"]
        w = reference.dequantize(info.data, info.type, int(np.prod(info.ne))).reshape(info.shape).astype(np.float64)
    hidden, *_ = np.linalg.lstsq(w, ref["logits"].astype(np.float64).T, rcond=None)
    assert np.abs(hidden.T @ w.T - ref["logits"]).max() < 1e-5          # the logits are reproduced exactly
    return ref["tokens"].astype(np.int64), hidden.T, w


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("name, tol", [("fx-f32", 1e-4), ("fx-q4_K_M", 2e-3), ("fxgqa-q4_0", 2e-3)])
def test_pooled_hidden_states_match_llama_cpp(fixtures_dir, name, tol):
    from airobackend.formats import open_model
    from airobackend.model import LlamaModel
    tokens, expect, w = llama_cpp_hidden_states(fixtures_dir, name)
    with open_model(str(fixtures_dir / "models" / f"{name}.gguf")) as mf:
        model = LlamaModel(mf, n_ctx=64, n_threads=2)
        model.eval(tokens[:5], 0)                                   # something in the cache that must survive
        k_before = model.cache.k.copy()
        hidden = model.hidden_states(tokens)
        assert np.array_equal(model.cache.k, k_before)              # scratch keys/values only
        assert hidden.shape == (len(tokens), model.n_embd)
        # every row is what the output layer turns into this model's logits (llama.cpp's within its noise floor)
        logits = model.eval(tokens, 0, logits_all=True)
        assert np.abs(hidden @ w.T - logits).max() < 10 * tol
    ours = unit(hidden.astype(np.float64).mean(axis=0))
    theirs = unit(expect.mean(axis=0))
    assert np.abs(ours - theirs).max() < tol and ours @ theirs > 1 - tol


@pytest.fixture(scope="module")
def engine(demo_model):
    from airobackend.manager import ModelManager
    from airobackend.settings import Settings
    manager = ModelManager(Settings(n_ctx=512))
    manager.load(manager.register(str(demo_model)))
    return manager


def test_engine_embed_pools_normalises_and_batches_like_one_by_one(engine):
    texts = ["The llama grazes.", "A much longer sentence about llamas, alpacas and their wool.", "x"]
    seqs = [engine.tokenize(t) for t in texts]
    vecs = engine.embed(seqs)
    raw = engine.embed(seqs, normalize=False)
    n_embd = engine.model_info()["n_embd"]
    for seq, v, r in zip(seqs, vecs, raw):
        assert v.shape == (n_embd,) and v.dtype == np.float32
        assert abs(np.linalg.norm(v.astype(np.float64)) - 1) < 1e-6
        np.testing.assert_allclose(v, unit(r.astype(np.float64)), atol=1e-7)
        # the vector is the mean of the model's hidden states (numpy over what the model gives)
        hidden = engine.model.hidden_states(np.array(seq))
        np.testing.assert_allclose(r, hidden.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    one_by_one = [engine.embed([s])[0] for s in reversed(seqs)][::-1]
    for a, b in zip(vecs, one_by_one):
        assert np.array_equal(a, b)
    assert vecs[0] @ vecs[1] < 0.9999                                # different texts, different vectors


def test_embedding_keeps_the_conversation_cache(engine):
    from airobackend.types import GenerationRequest, SamplingParams
    prompt = "USER: Tell me a story about a llama who learns to sing. ASSISTANT:"
    req = lambda: GenerationRequest(prompt=prompt, max_tokens=4, sampling=SamplingParams(temperature=0, seed=1))  # noqa
    first = "".join(ev.text for ev in engine.generate(req()))
    engine.embed([engine.tokenize("Something else entirely, embedded between two turns.")])
    second = "".join(ev.text for ev in engine.generate(req()))
    assert second == first
    assert engine.perf()["last_process_count"] == 1        # only the last prompt token was evaluated again


def test_python_api_embed_and_create_embedding(demo_model):
    from airobackend.llama import Llama
    m = Llama(str(demo_model), n_ctx=128, n_threads=2, verbose=False)
    try:
        one = m.embed("hello there")
        many, count = m.embed(["hello there", "general kenobi"], return_count=True)
        assert isinstance(one, list) and len(one) == m.n_embd() and many[0] == one
        assert count == len(m.tokenize(b"hello there")) + len(m.tokenize(b"general kenobi"))
        assert abs(np.linalg.norm(m.embed("hello there", normalize=True)) - 1) < 1e-6
        assert m.n_tokens == 0                                   # the context is not touched
        r = m.create_embedding(["hello there"])
        assert r["object"] == "list" and r["usage"]["prompt_tokens"] == len(m.tokenize(b"hello there"))
        np.testing.assert_allclose(r["data"][0]["embedding"], unit(np.array(one, np.float64)), atol=1e-6)
        json.dumps(r)
    finally:
        m.close()
