"""Long chats through the server on the demo model: a trimmed history evaluates only its new tokens, every protocol
reports the reuse, slot save/restore is an admin action that refuses other models' and damaged files, and the RoPE
values used beyond the trained context are reported."""
from __future__ import annotations

import json
import os

import pytest
from starlette.testclient import TestClient

from fakes import make_app

MEMORY = "A chat between a curious traveller and Seraphina, the guardian of the forest. " * 3
WORDS = ("rain birch wolf river stone owl moss lantern storm bridge valley ember frost meadow thorn willow cloud "
         "harbor candle feather").split()
LINES = [" ".join(f"the {WORDS[(i * 7 + k * 3) % len(WORDS)]} of {WORDS[(i * 5 + k) % len(WORDS)]}"
                  for k in range(6)) + f", said traveller {i}." for i in range(12)]       # distinct messages


def history(first: int, last: int) -> str:
    return "".join(f"\nUSER: {LINES[i]}\nASSISTANT: I see." for i in range(first, last))


def manager_for(path: str, n_ctx: int, **settings):
    from airobackend.manager import ModelManager
    from airobackend.settings import Settings
    manager = ModelManager(Settings(n_ctx=n_ctx, multiuser=4, **settings))
    manager.load(manager.register(path))
    return manager


@pytest.fixture
def chat_app(demo_model):
    manager = manager_for(demo_model, 1024)
    app = make_app(manager, n_ctx=1024)
    yield app, manager
    manager.unload()


def kobold(client, prompt: str, **kw) -> dict:
    """A KoboldCpp generate; KoboldCpp reports the reuse in /api/extra/perf."""
    r = client.post("/api/v1/generate", json=dict(prompt=prompt, memory=MEMORY, max_length=4, temperature=0,
                                                  **kw))
    assert r.status_code == 200, r.text
    perf = client.get("/api/extra/perf").json()
    return {"cache_n": perf["last_cached_count"], "prompt_n": perf["last_process_count"],
            "prompt_tokens": perf["last_input_count"]}


def test_trimmed_history_reuses_the_cache_in_every_protocol(chat_app):
    app, manager = chat_app
    c = TestClient(app)
    assert kobold(c, history(0, 8))["cache_n"] == 0
    n_new = len(manager.tokenize(history(8, 9), add_bos=False))
    # KoboldCpp: memory at the top, two oldest messages dropped, one new one
    t = kobold(c, history(2, 9))
    assert t["cache_n"] > 0 and t["prompt_n"] <= n_new + 8 and t["cache_n"] + t["prompt_n"] == t["prompt_tokens"]
    # OpenAI completions: the same conversation, trimmed further (no memory field: it is part of the prompt)
    r = c.post("/v1/completions", json={"prompt": MEMORY + history(3, 10), "max_tokens": 3, "temperature": 0})
    body = r.json()
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == body["timings"]["cache_n"] > 0 and body["timings"]["prompt_n"] <= n_new + 8
    assert body["timings"]["prompt_n"] + cached == body["usage"]["prompt_tokens"]
    # OpenAI chat stream: the last chunk carries the timings, the usage chunk the cached tokens
    msgs = [{"role": "system", "content": MEMORY}] + [{"role": "user", "content": LINES[i]} for i in range(4, 11)]
    for stream_msgs in (msgs[:-1], [msgs[0]] + msgs[2:]):
        r = c.post("/v1/chat/completions", json={"messages": stream_msgs, "max_tokens": 3, "temperature": 0,
                                                 "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    final = [ch for ch in chunks if ch.get("timings")]
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    assert final and final[-1]["timings"]["cache_n"] > 0
    assert usage[-1]["prompt_tokens_details"]["cached_tokens"] == final[-1]["timings"]["cache_n"]
    # text-generation-webui's legacy route (its own dialect; the reuse shows in the same counters)
    r = c.post("/api/v1/generate", json={"prompt": MEMORY + history(5, 12), "max_new_tokens": 3,
                                         "temperature": 0})
    assert r.status_code == 200 and set(r.json()) == {"results"}
    assert c.get("/api/extra/perf").json()["last_cached_count"] > 0


def test_python_api_reports_cached_tokens(demo_model):
    from airobackend.llama import Llama
    llm = Llama(demo_model, n_ctx=1024, verbose=False)
    first = llm.create_completion(MEMORY + history(0, 8), max_tokens=2, temperature=0)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = llm.create_completion(MEMORY + history(2, 9), max_tokens=2, temperature=0)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > second["usage"]["prompt_tokens"] // 2
    llm.close()


# ---------------------------------------------------------------------------------------------- slots

@pytest.fixture
def slot_app(demo_model, tmp_path):
    manager = manager_for(demo_model, 512, prompt_cache_dir=str(tmp_path / "states"))
    app = make_app(manager, n_ctx=512, api_key="user-key", admin_key="admin-key")
    yield app, manager, tmp_path / "states"
    manager.unload()


ADMIN = {"Authorization": "Bearer admin-key"}


def test_slot_save_restore_erase(slot_app):
    app, manager, folder = slot_app
    c = TestClient(app)
    user = {"Authorization": "Bearer user-key"}
    r = c.post("/v1/completions", headers=user, json={"prompt": MEMORY + history(0, 4), "max_tokens": 3,
                                                      "temperature": 0})
    n_prompt = r.json()["timings"]["prompt_n"]
    assert c.post("/slots/0?action=save", headers=user, json={"filename": "a.bin"}).status_code == 401
    saved = c.post("/slots/0?action=save", headers=ADMIN, json={"filename": "a.bin"}).json()
    assert saved["n_saved"] >= n_prompt and saved["n_written"] == os.path.getsize(folder / "a.bin")
    erased = c.post("/slots/0?action=erase", headers=ADMIN).json()
    assert erased == {"id_slot": 0, "n_erased": saved["n_saved"]}
    restored = c.post("/slots/0?action=restore", headers=ADMIN, json={"filename": "a.bin"}).json()
    assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"]
    r = c.post("/v1/completions", headers=user, json={"prompt": MEMORY + history(0, 4), "max_tokens": 3,
                                                      "temperature": 0})
    assert r.json()["timings"]["prompt_n"] == 1           # all but the last prompt token came from the file
    # bad requests: the llama.cpp error shape, nothing written outside the folder
    for body, status in (({"filename": "../escape.bin"}, 400), ({"filename": "/tmp/x.bin"}, 400),
                         ({"filename": ".hidden"}, 400), ({}, 400)):
        r = c.post("/slots/0?action=save", headers=ADMIN, json=body)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert not (folder.parent / "escape.bin").exists()
    assert c.post("/slots/1?action=save", headers=ADMIN, json={"filename": "b.bin"}).status_code == 400
    assert c.post("/slots/0?action=frobnicate", headers=ADMIN, json={"filename": "b.bin"}).status_code == 400
    r = c.post("/slots/0?action=restore", headers=ADMIN, json={"filename": "missing.bin"})
    assert r.status_code == 400 and "no state file" in r.json()["error"]["message"]
    # a truncated file is refused and the slot keeps what it had
    data = (folder / "a.bin").read_bytes()
    (folder / "cut.bin").write_bytes(data[:len(data) // 2])
    r = c.post("/slots/0?action=restore", headers=ADMIN, json={"filename": "cut.bin"})
    assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
    r = c.post("/v1/completions", headers=user, json={"prompt": MEMORY + history(0, 4), "max_tokens": 3,
                                                      "temperature": 0})
    assert r.json()["timings"]["prompt_n"] == 1


def test_slots_need_the_folder(demo_engine):
    c = TestClient(make_app(demo_engine, n_ctx=256))
    r = c.post("/slots/0?action=save", json={"filename": "a.bin"})
    assert r.status_code == 501 and "--prompt-cache-dir" in r.json()["error"]["message"]


def test_a_state_of_another_model_is_refused(slot_app, tmp_path, fixtures_dir):
    """A state file written for one model is refused by another with a clear error; the slot is unchanged."""
    from airobackend.llama import Llama
    app, manager, folder = slot_app
    other = Llama(str(fixtures_dir / "models" / "fx-q8_0.gguf"), n_ctx=64, verbose=False)
    other.eval([1, 450, 439, 860])
    (folder / "other.bin").write_bytes(other.save_state().llama_state)
    other.close()
    c = TestClient(app)
    r = c.post("/slots/0?action=restore", headers=ADMIN, json={"filename": "other.bin"})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "another model" in msg and "fx-q8_0.gguf" in msg


# ---------------------------------------------------------------------------------------------- RoPE

def test_rope_values_beyond_the_trained_context_are_reported(demo_model):
    """The demo model was trained at 2048; at 4096 the base is raised as KoboldCpp does, and every model info route
    says so."""
    manager = manager_for(demo_model, 4096)
    try:
        c = TestClient(make_app(manager, n_ctx=4096))
        info = c.get("/api/extra/true_max_context_length").json()
        assert info["value"] == 4096 and info["n_ctx_train"] == 2048 and info["rope_scaling"] == "auto"
        assert info["rope_freq_base"] == pytest.approx(30138.9, abs=0.05) and info["rope_freq_scale"] == 1.0
        meta = c.get("/v1/models").json()["data"][0]["meta"]
        assert meta["rope_freq_base"] == info["rope_freq_base"] and meta["n_ctx_train"] == 2048
        assert c.get("/v1/internal/model/info").json()["rope_freq_base"] == info["rope_freq_base"]
        tgw = c.post("/api/v1/model", json={"action": "info"}).json()["result"]["shared.args"]
        assert tgw["rope_freq_base"] == info["rope_freq_base"] and tgw["compress_pos_emb"] == 1.0
    finally:
        manager.unload()


# ---------------------------------------------------------------------------------------------- flags

def test_long_chat_flags_llama_cpp_and_koboldcpp_spellings():
    """The flags reach Settings (env first, flags on top): llama.cpp's --cache-reuse and --slot-save-path,
    KoboldCpp's --noshift, ours for the prompt cache."""
    import argparse

    from airobackend.commands import serve

    def settings(argv, environ=None):
        p = argparse.ArgumentParser()
        serve.add_arguments(p)
        return serve.settings_from_args(p.parse_args(argv), environ=environ or {})

    s = settings(["m.gguf"])
    assert (s.context_shift, s.cache_reuse, s.cache_slots, s.prompt_cache_mb, s.prompt_cache_dir) == \
        (True, 32, 4, None, None)
    s = settings(["m.gguf", "--noshift", "--cache-reuse", "64", "--cache-slots", "2", "--prompt-cache-mb", "512",
                  "--slot-save-path", "/srv/states"])
    assert (s.context_shift, s.cache_reuse, s.cache_slots, s.prompt_cache_mb, s.prompt_cache_dir) == \
        (False, 64, 2, 512, "/srv/states")
    s = settings(["--prompt-cache-dir", "/a"], {"AIRO_CONTEXT_SHIFT": "0", "AIRO_CACHE_REUSE": "8",
                                                "AIRO_PROMPT_CACHE_DIR": "/b", "AIRO_PROMPT_CACHE_MB": "0"})
    assert (s.context_shift, s.cache_reuse, s.prompt_cache_dir, s.prompt_cache_mb) == (False, 8, "/a", 0)
