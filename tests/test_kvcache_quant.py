"""Quantized KV cache (q8_0, q4_0) end to end: logits against llama.cpp's with the same cache type, memory, key
re-rotation of quantized keys, and the settings that choose the type (CLI, environment, load options, Python API)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from airobackend.commands import inspect as inspect_cmd
from airobackend.commands import run as run_cmd
from airobackend.commands import serve
from airobackend.errors import RequestError
from airobackend.formats import HParams, kv_cache_bytes
from airobackend.kernels import kvquant, ops
from airobackend.kvcache import CODECS, KVCache
from airobackend.llama import Llama
from airobackend.adapters.kobold import config_overrides
from airobackend.adapters.textgen import load_options
from airobackend.manager import parse_load_options
from airobackend.settings import KV_CACHE_TYPES

F32_TOL = 1e-3          # float32 summation order (tests/test_model_fidelity.py)
QUANT = ["q8_0", "q4_0"]


def _kv_models(fixtures_dir):
    p = fixtures_dir / "reference" / "kvcache" / "index.json"
    if not p.is_file():
        pytest.skip(f"llama.cpp's quantized-cache references are not in {p.parent}")
    return json.loads(p.read_text())["models"]


def _noise(fixture_index, name):
    return next(m for m in fixture_index["models"] if m["name"] == name)["noise_floor"]["max_abs"]


def _run(path, cache_type, backend, tokens, greedy):
    """Logits after the prompt as one batch, then after each of llama.cpp's greedy tokens fed one at a time."""
    llm = Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False, type_k=cache_type,
                type_v=cache_type, kernels="generic" if backend == "generic" else "auto")
    try:
        assert (llm.model.cache.type_k, llm.model.cache.type_v) == (cache_type, cache_type)
        llm.eval(tokens)
        last = llm.scores[len(tokens) - 1].copy()
        for t in greedy[:-1]:
            llm.eval([int(t)])
        return last, llm.scores[len(tokens):len(tokens) + len(greedy) - 1].copy()
    finally:
        llm.close()


@pytest.mark.parametrize("backend", ["fast", "generic"])
@pytest.mark.parametrize("cache_type", QUANT)
def test_logits_match_llama_cpp_with_the_same_cache_type(fixtures_dir, fixture_index, cache_type, backend):
    """For every model with references: our logits with a q8_0 / q4_0 cache land within the model's noise floor plus
    the movement llama.cpp's own logits show for that cache type (fixtures README, reference/kvcache/), along the
    batch and along llama.cpp's greedy continuation; our movement from our f16 cache is at most llama.cpp's, within
    the noise floor."""
    for m in _kv_models(fixtures_dir):
        ref = np.load(fixtures_dir / m["reference"])
        noise, moved = _noise(fixture_index, m["name"]), m[f"max_abs_{cache_type}_vs_f16"]
        tol = noise + moved + F32_TOL
        tokens, greedy = ref["tokens"], ref[f"{cache_type}_greedy"]
        last, steps = _run(fixtures_dir / m["gguf"], cache_type, backend, tokens, greedy)
        assert np.abs(last - ref[f"{cache_type}_batch_last"]).max() <= tol, m["name"]
        want = ref[f"{cache_type}_greedy_logits"]
        assert np.abs(steps - want).max() <= tol, m["name"]
        top2 = np.sort(want, axis=-1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] > 2 * tol
        assert (steps.argmax(-1) == want.argmax(-1))[decided].all(), m["name"]
        f16_last, _ = _run(fixtures_dir / m["gguf"], "f16", backend, tokens, greedy[:1])
        ours_moved = np.abs(last - f16_last).max()
        # above float32 noise (the cache is quantized), not beyond llama.cpp's own movement (with float32
        # activations ours moves less: llama.cpp's figure also holds activation-quantization noise, ~ the floor)
        assert F32_TOL < ours_moved <= moved + 2 * noise + F32_TOL, (m["name"], ours_moved, moved)


def test_cache_bytes_are_ggmls_and_q8_0_halves_the_65b_cache():
    h65 = HParams(n_vocab=32000, n_embd=8192, n_head=64, n_head_kv=64, n_layer=80, n_ff=22016, n_rot=128)
    f16 = kv_cache_bytes(h65, 2048)
    assert f16 == 5 << 30                                                   # 5 GiB at 2048
    for t, ratio in (("q8_0", 34 / 64), ("q4_0", 18 / 64)):
        assert kv_cache_bytes(h65, 2048, t, t) == f16 * ratio              # 0.53 and 0.28 of f16
        assert KVCache.size_bytes(80, 64, 2048, 128, t, t) == kv_cache_bytes(h65, 2048, t, t)
    for tk in KV_CACHE_TYPES:
        for tv in KV_CACHE_TYPES:
            c = KVCache(2, 3, 10, 64, n_rot=64, freq_base=1e4, type_k=tk, type_v=tv)
            h = HParams(n_vocab=10, n_embd=192, n_head=3, n_head_kv=3, n_layer=2, n_ff=8, n_rot=64)
            assert c.nbytes == KVCache.size_bytes(2, 3, 10, 64, tk, tv) == kv_cache_bytes(h, 10, tk, tv)
    assert set(CODECS) == set(KV_CACHE_TYPES)


@pytest.mark.parametrize("cache_type", QUANT)
def test_moved_quantized_keys_equal_keys_quantized_at_the_new_positions(cache_type):
    """Moving dequantizes, rotates by the position difference and quantizes again (llama.cpp's K shift): the keys
    then match keys roped at the new positions and quantized there, within about two quantization steps of their
    block; values are copied bit for bit."""
    rng = np.random.default_rng(3)
    n, hd = 30, 64
    c = KVCache(2, 2, 40, hd, n_rot=hd, freq_base=10000.0, type_k=cache_type, type_v=cache_type)
    raw = rng.standard_normal((2, n, 2, hd)).astype(np.float32)
    for il in range(2):
        c.rope_store(il, np.zeros((n, 4, hd), np.float32), raw[il].copy(), raw[il][:, :, ::-1].copy(),
                     np.arange(n, dtype=np.int64), 0)
    c.n_past = n
    v_before = c.v[:, :, 12:30].copy()
    assert c.remove(4, 12) == 22
    t = kvquant.TYPES[cache_type]
    for il in range(2):
        fresh = raw[il][12:30].copy()
        ops.rope(fresh, np.arange(4, 22, dtype=np.int64), hd, 10000.0, 1.0)
        fresh_rows = kvquant.quantize_ref(fresh, t)                           # [m, heads, row]
        want = kvquant.dequantize_ref(fresh_rows, t, hd)
        got = kvquant.dequantize_ref(c.k[il, :, 4:22], t, hd).transpose(1, 0, 2)
        step = np.abs(want).reshape(*want.shape[:-1], -1, 32).max(-1) / (127 if t == kvquant.Q8_0 else 8)
        err = np.abs(got - want).reshape(step.shape + (32,)).max(-1)
        assert (err <= 2 * step + 1e-6).all(), (err / step).max()
        assert (err > 0).any()                                  # it did requantize (not a plain copy)
    np.testing.assert_array_equal(c.v[:, :, 4:22], v_before)


@pytest.mark.parametrize("cache_type", QUANT)
def test_state_restored_gives_identical_logits(fixtures_dir, fixture_index, cache_type):
    path = fixtures_dir / next(m for m in fixture_index["models"] if m["name"] == "fx-q4_0")["files"]["gguf"]["path"]
    llm = Llama(str(path), n_ctx=48, verbose=False, type_k=cache_type, type_v=cache_type)
    try:
        toks = [1, 450, 439, 860, 289, 798, 113, 285, 114]
        a = llm.model.eval(toks, 0)
        snap = llm.model.cache.snapshot()
        assert snap.nbytes == len(toks) * llm.model.cache.bytes_per_position
        b = llm.model.eval([123, 432], len(toks))
        llm.model.eval([5, 6, 7, 8, 9], 0)                     # overwrite
        llm.model.cache.restore(snap)
        np.testing.assert_array_equal(llm.model.eval([123, 432], len(toks)), b)
        assert a.shape == (1, llm.n_vocab())
    finally:
        llm.close()


# ---------------------------------------------------------------- choosing the type

def _parse_serve(argv):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(argv)


def test_serve_flags_llama_cpp_and_koboldcpp_spellings():
    s = serve.settings_from_args(_parse_serve(["m.gguf", "--quantkv", "1", "--flashattention"]), environ={})
    assert (s.cache_type_k, s.cache_type_v) == ("q8_0", "q8_0")
    s = serve.settings_from_args(_parse_serve(["m.gguf", "--quantkv", "2"]), environ={})   # no --flashattention needed
    assert (s.cache_type_k, s.cache_type_v) == ("q4_0", "q4_0")
    s = serve.settings_from_args(_parse_serve(["-ctk", "q4_0", "--quantkv", "1"]), environ={})
    assert (s.cache_type_k, s.cache_type_v) == ("q4_0", "q8_0")                        # explicit -ctk wins
    s = serve.settings_from_args(_parse_serve(["--cache-type-v", "q8_0"]), environ={"AIRO_CACHE_TYPE_K": "q4_0"})
    assert (s.cache_type_k, s.cache_type_v) == ("q4_0", "q8_0")
    s = serve.settings_from_args(_parse_serve(["--quantkv", "0"]), environ={})
    assert (s.cache_type_k, s.cache_type_v) == ("f16", "f16")
    for bad in (["-ctk", "q5_1"], ["--quantkv", "3"]):
        with pytest.raises(SystemExit):
            _parse_serve(bad)


def test_run_flags_and_load_options():
    p = argparse.ArgumentParser()
    run_cmd.add_arguments(p)
    s = run_cmd.build_settings(p.parse_args(["-ctk", "q8_0", "-ctv", "q4_0"]), environ={})
    assert (s.cache_type_k, s.cache_type_v) == ("q8_0", "q4_0")
    assert load_options({"cache_type": "q8_0"}) == {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    assert load_options({"cache_type": "fp16"}) == {"cache_type_k": "f16", "cache_type_v": "f16"}
    assert config_overrides({"quantkv": 2}) == {"cache_type_k": "q4_0", "cache_type_v": "q4_0"}
    assert load_options({"cache_8bit": True}) == {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    assert parse_load_options({"cache_type_v": "Q4_0"}) == {"cache_type_v": "q4_0"}
    with pytest.raises(RequestError, match="args.cache_type_k"):
        parse_load_options({"cache_type_k": "q2_K"})
    with pytest.raises(RequestError, match="args.cache_type"):
        load_options({"cache_type": "q2_K"})
    with pytest.raises(RequestError):
        config_overrides({"quantkv": 5})


def test_python_api_takes_llama_cpp_python_type_numbers(fixtures_dir, fixture_index):
    path = fixtures_dir / next(m for m in fixture_index["models"] if m["name"] == "fx-f16")["files"]["gguf"]["path"]
    llm = Llama(str(path), n_ctx=32, verbose=False, type_k=8, type_v=2, flash_attn=True)   # GGML_TYPE_Q8_0, Q4_0
    try:
        assert (llm.model.type_k, llm.model.type_v) == ("q8_0", "q4_0")
        assert llm.model.cache.nbytes == KVCache.size_bytes(llm.model.n_layer, llm.model.n_head_kv, 32,
                                                            llm.model.head_dim, "q8_0", "q4_0")
    finally:
        llm.close()
    with pytest.raises(RequestError, match="q5_1"):
        Llama(str(path), n_ctx=32, verbose=False, type_k="q5_1")


def test_a_head_size_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(1, 2, 8, 48, n_rot=48, freq_base=1e4, type_k="q8_0")
    KVCache(1, 2, 8, 48, n_rot=48, freq_base=1e4)              # f16 takes any head size


def test_inspect_counts_the_cache_type(fixtures_dir, capsys):
    path = str(fixtures_dir / "models" / "fx-f16.gguf")
    p = argparse.ArgumentParser()
    inspect_cmd.add_arguments(p)
    sizes = {}
    for argv in ([], ["--quantkv", "1"], ["-ctk", "q4_0", "-ctv", "q4_0"]):
        assert inspect_cmd.main(p.parse_args([path, "--n-ctx", "1024", "--json"] + argv)) == 0
        d = json.loads(capsys.readouterr().out)
        sizes[d["cache_type_k"]] = (d["kv_cache_bytes"], d["ram_bytes"])
    assert sizes["q8_0"][0] * 64 == sizes["f16"][0] * 34 and sizes["q4_0"][0] * 64 == sizes["f16"][0] * 18
    assert sizes["f16"][1] - sizes["q8_0"][1] == sizes["f16"][0] - sizes["q8_0"][0]
    assert inspect_cmd.main(p.parse_args([path, "--quantkv", "1"])) == 0
    assert "q8_0/q8_0" in capsys.readouterr().out
