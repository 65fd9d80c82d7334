"""KV state files: a restored state gives the logits the saved context gave; another model's, a truncated, a corrupt
or a misnamed file is refused before anything changes; saved states survive an engine's end and a model switch."""
from __future__ import annotations

import numpy as np
import pytest

from airobackend.kvstate import StateDir, StateFileError, safe_path
from airobackend.llama import Llama
from airobackend.settings import Settings


@pytest.fixture(scope="module")
def paths(fixtures_dir):
    m = fixtures_dir / "models"
    return {"q8": str(m / "fx-q8_0.gguf"), "q8_ggml": str(m / "fx-q8_0.ggmlv3.bin"), "q4": str(m / "fx-q4_0.gguf"),
            "gqa": str(m / "fxgqa-q4_K_M.gguf")}


TOKENS = [1, 450, 439, 860, 289, 798, 113, 285, 114, 123, 432, 398, 567, 975, 278, 425]


def test_restored_state_gives_identical_logits(paths):
    a = Llama(paths["q8_ggml"], n_ctx=64, verbose=False, logits_all=True)
    a.eval(TOKENS[:12])
    state = a.save_state()
    assert state.n_tokens == 12 and state.llama_state_size == len(state.llama_state)
    want = a.model.eval(TOKENS[12:], 12, logits_all=True)
    b = Llama(paths["q8_ggml"], n_ctx=64, verbose=False)           # a fresh process's view: nothing cached
    b.load_state(state)
    assert b.n_tokens == 12 and list(b.input_ids[:12]) == TOKENS[:12]
    got = b.model.eval(TOKENS[12:], 12, logits_all=True)
    np.testing.assert_array_equal(got, want)
    # and through the high-level API: the restored prefix is reused, not evaluated again
    out = b.create_completion(TOKENS[:12] + [398], max_tokens=1, temperature=0)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 12
    for llm in (a, b):
        llm.close()


def test_state_of_another_model_or_settings_is_refused(paths):
    a = Llama(paths["q8"], n_ctx=64, verbose=False)
    a.eval(TOKENS[:8])
    state = a.save_state()
    for other in (paths["q4"], paths["q8_ggml"]):                   # another mix; the same weights in another file
        b = Llama(other, n_ctx=64, verbose=False)
        b.eval(TOKENS[:3])
        before = b.model.cache.k[:, :, :3].copy()
        with pytest.raises(StateFileError, match="another model"):
            b.load_state(state)
        assert b.n_tokens == 3 and np.array_equal(b.model.cache.k[:, :, :3], before)     # nothing changed
        b.close()
    c = Llama(paths["q8"], n_ctx=64, verbose=False, rope_freq_base=20000.0)
    with pytest.raises(StateFileError, match="rope_freq_base"):
        c.load_state(state)
    c.close()
    a.close()


def test_truncated_corrupt_and_foreign_files_are_refused(paths, tmp_path):
    a = Llama(paths["gqa"], n_ctx=64, verbose=False)
    a.eval(TOKENS[:10])
    d = StateDir(tmp_path, max_auto=2, **a.state_identity)
    n = d.save("s.bin", TOKENS[:10], a.model.cache.snapshot(10))
    data = (tmp_path / "s.bin").read_bytes()
    assert len(data) == n
    tokens, snap = d.load("s.bin")
    assert tokens == TOKENS[:10] and np.array_equal(snap.k, a.model.cache.k[:, :, :10])
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(StateFileError, match="truncated"):
        d.load("cut.bin")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (tmp_path / "flip.bin").write_bytes(bytes(flipped))
    with pytest.raises(StateFileError, match="checksum"):
        d.load("flip.bin")
    (tmp_path / "junk.bin").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(StateFileError, match="not a KV state file"):
        d.load("junk.bin")
    with pytest.raises(StateFileError, match="no state file"):
        d.load("nothing.bin")
    a.close()


@pytest.mark.parametrize("name", ["../x.bin", "/etc/passwd", "a/b.bin", "..", ".hidden", "", "a\\b", "x" * 300,
                                  "nul\x00.bin", 5, None])
def test_client_file_names_cannot_leave_the_folder(tmp_path, name):
    with pytest.raises(StateFileError):
        safe_path(tmp_path, name)


def test_plain_names_stay_in_the_folder(tmp_path):
    assert safe_path(tmp_path, "chat-1.v2_state.bin") == (tmp_path / "chat-1.v2_state.bin").resolve()


def test_saved_states_survive_the_engine_and_a_model_switch(paths, tmp_path):
    """With a prompt-cache folder, an engine that ends writes its states there; a new engine of the same model (a
    restart, or a switch back) finds them and reuses them; another model's engine does not."""
    from airobackend.engine import Engine
    from airobackend.types import GenerationRequest, SamplingParams
    greedy = SamplingParams(temperature=0.0)
    settings = Settings(n_ctx=128, prompt_cache_dir=str(tmp_path), prompt_cache_mb=0, cache_slots=2)
    prompt = TOKENS + TOKENS[1:] + TOKENS[1:9]

    def run(path, tokens):
        llm = Llama(path, n_ctx=128, verbose=False)
        e = Engine(llm, settings)
        last = list(e.generate(GenerationRequest(tokens=tokens, max_tokens=2, sampling=greedy)))[-1]
        return llm, e, last

    llm, e, last = run(paths["q8"], prompt)
    assert last.cached_tokens == 0
    e.close()
    llm.close()
    assert len(list((tmp_path / "auto").iterdir())) == 1
    llm, e, last = run(paths["q4"], prompt)                   # another model: its states are not candidates
    assert last.cached_tokens == 0
    e.close()
    llm.close()
    llm, e, last = run(paths["q8"], prompt + [501, 502])      # back: the saved conversation is reused
    assert last.cached_tokens >= len(prompt)
    e.close()
    llm.close()


def test_python_api_prompt_cache_switches_conversations(paths, tmp_path):
    """llama-cpp-python's set_cache: with LlamaRAMCache a conversation that comes back after another one is restored,
    not evaluated again; with None it is not; LlamaDiskCache keeps it for another Llama of the same model."""
    from airobackend.llama import LlamaDiskCache, LlamaRAMCache
    alice, bob = TOKENS * 3, [1] + TOKENS[::-1] * 2

    def cached(llm, tokens):
        return llm.create_completion(tokens, max_tokens=1, temperature=0)["usage"]["prompt_tokens_details"][
            "cached_tokens"]

    llm = Llama(paths["q8"], n_ctx=128, verbose=False)
    for cache, want in ((LlamaRAMCache(capacity_bytes=16 << 20), len(alice)), (None, 1)):
        llm.set_cache(cache)
        llm.reset()
        assert cached(llm, alice) == 0
        cached(llm, bob)                                      # alice's cache is overwritten (or saved first)
        assert cached(llm, alice + [500, 501]) == want        # only BOS is shared with bob
    llm.set_cache(LlamaDiskCache(cache_dir=str(tmp_path), capacity_bytes=16 << 20))
    cached(llm, alice)
    llm.close()                                               # the states go to the folder
    again = Llama(paths["q8"], n_ctx=128, verbose=False)
    again.set_cache(LlamaDiskCache(cache_dir=str(tmp_path), capacity_bytes=16 << 20))
    assert cached(again, alice + [500, 501]) == len(alice)
    again.close()
