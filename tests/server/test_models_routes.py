"""Model management through the three protocols: list, load, switch, unload, refusals, admin key, races.

Protocol flows run the real engine on llama.cpp-made fixture files: after each switch the first greedy token is
llama.cpp's for the model loaded at that moment. The race with a streaming request uses a scripted engine whose
tokens the test releases one by one, so the interleaving is exact.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from airobackend.library import GB
from airobackend.manager import ModelManager
from airobackend.plugins import DEFAULT_PLUGINS, get_plugin_manager
from airobackend.server import create_app
from airobackend.settings import Settings
from airobackend.types import FinishReason, GenerationEvent
from sync import settle, watched

TIMEOUT = 20.0
PLUGINS = tuple(p for p in DEFAULT_PLUGINS if not p.endswith(".models")) + ("airobackend.adapters.models",)


@pytest.fixture()
def library_dir(tmp_path, fixtures_dir) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("fx-q2_K.ggmlv3.bin", "fxgqa-f16.gguf", "fx-q8_0.gguf"):
        shutil.copyfile(fixtures_dir / "models" / name, d / name)
    return d


def client_for(manager: ModelManager, settings: Settings) -> TestClient:
    pm = get_plugin_manager(load_entrypoints=False, defaults=PLUGINS)
    return TestClient(create_app(manager, settings, pm))


def no_paths(resp, *paths) -> None:
    for p in paths:
        assert str(p) not in resp.text, f"{resp.request.url.path} answered with a file system path"


# ---------------------------------------------------------------- scripted engine (for auth and races)

class ScriptedEngine:
    """Yields '<model name>:' then the prompt; with `gate` set each event waits for a release."""

    def __init__(self, name: str):
        self.name = name
        self.gate: threading.Semaphore | None = None
        self.started = threading.Event()
        self._abort = threading.Event()

    def generate(self, req):
        def events():
            self.started.set()
            for piece in (self.name, ":", req.prompt or ""):
                if self.gate is not None:
                    self.gate.acquire(timeout=TIMEOUT)
                if self._abort.is_set():
                    yield GenerationEvent(finish_reason=FinishReason.ABORTED)
                    return
                yield GenerationEvent(text=piece)
            yield GenerationEvent(finish_reason=FinishReason.LENGTH, completion_tokens=3)
        return events()

    def abort(self, genkey=None):
        self._abort.set()
        if self.gate is not None:
            self.gate.release(10)
        return True

    def tokenize(self, text, add_bos=True):
        return [1] * add_bos + [ord(c) % 1000 for c in text]

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids)

    def partial_text(self, genkey=None):
        return ""

    def perf(self):
        return {"queue": 0, "idle": 1}

    def model_info(self):
        return {"name": Path(self.name).name, "path": None, "mix": "q", "format": "gguf", "n_ctx": 256,
                "n_vocab": 1000, "template": "airoboros"}

    def format_chat(self, messages):
        return " ".join(m["content"] for m in messages)


def scripted_manager(library_dir, **settings_kw):
    settings = Settings(model_dir=str(library_dir), n_ctx=256, **settings_kw)
    built = {}

    def factory(entry, s, progress):
        progress(0.5)
        built[entry.name] = ScriptedEngine(entry.name)
        return built[entry.name], None

    return watched(ModelManager(settings, engine_factory=factory)), settings, built


# ---------------------------------------------------------------- listing

def test_every_protocol_lists_the_library(library_dir):
    mgr, settings, _ = scripted_manager(library_dir)
    names = ["fx-q2_K.ggmlv3.bin", "fx-q8_0.gguf", "fxgqa-f16.gguf"]
    with client_for(mgr, settings) as c:
        r = c.post("/api/v1/model", json={"action": "list"})
        assert r.status_code == 200 and r.json() == {"result": ["None", *names]}
        assert c.get("/v1/internal/model/list").json() == {"model_names": names}
        assert c.get("/api/admin/list_options").json() == ["unload_model", *names]
        info = c.post("/api/v1/model", json={"action": "info"}).json()["result"]
        assert info["model_name"] == "None" and info["lora_names"] == []
        assert {"truncation_length", "instruction_template"} <= set(info["shared.settings"])
        assert c.get("/api/v1/model").json() == {"result": "ReadOnly"}    # KoboldCpp's "no model" for Lite/ST
        # No action: the loaded model's name, as text-generation-webui answers.
        assert c.post("/api/v1/model", json={}).json() == {"result": "None"}
        for path in ("/v1/internal/model/list", "/api/admin/list_options"):
            no_paths(c.get(path), library_dir)


def _wait_loaded(c, mgr, name):
    """Wait for the load under way to end (on the manager's condition), then read the status as a client would."""
    settle(mgr, lambda: mgr.loading_name is None)
    status = c.get("/api/admin/load_status").json()
    assert status["loading"] is None and status["loaded"] == name, status
    return status


def test_kobold_admin_initial_model_and_unload_model(library_dir):
    mgr, settings, _ = scripted_manager(library_dir)
    mgr.load("fx-q8_0.gguf")              # what `serve --model fx-q8_0.gguf` does at start
    with client_for(mgr, settings) as c:
        assert c.get("/api/admin/list_options").json()[:2] == ["initial_model", "unload_model"]
        assert c.post("/api/admin/reload_config", json={"filename": "fx-q2_K.ggmlv3.bin"}).json()["success"]
        _wait_loaded(c, mgr, "fx-q2_K.ggmlv3.bin")
        assert c.post("/api/admin/reload_config", json={"filename": "initial_model"}).json()["success"]
        _wait_loaded(c, mgr, "fx-q8_0.gguf")
        assert c.post("/api/admin/reload_config", json={"filename": "unload_model"}).json() == {"success": True}
        assert c.get("/api/v1/model").json() == {"result": "ReadOnly"}
        r = c.post("/api/v1/generate", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["detail"]["type"] == "service_unavailable"


# ---------------------------------------------------------------- admin key

@pytest.mark.parametrize("keys", [dict(api_key="user-key", admin_key="admin-key"), dict(api_key="user-key"),
                                  dict(admin_key="admin-key")])
def test_model_changes_need_the_admin_key(library_dir, keys):
    mgr, settings, _ = scripted_manager(library_dir, **keys)
    admin = keys.get("admin_key") or keys["api_key"]
    user = {"Authorization": "Bearer user-key"} if "api_key" in keys else {}
    as_admin = {"Authorization": f"Bearer {admin}"}
    with client_for(mgr, settings) as c:
        changes = [
            ("POST", "/api/v1/model", {"action": "load", "model_name": "fx-q8_0.gguf"}),
            ("POST", "/api/v1/model", {"action": "unload"}),
            ("POST", "/v1/internal/model/load", {"model_name": "fx-q8_0.gguf"}),
            ("POST", "/v1/internal/model/unload", None),
            ("GET", "/v1/internal/model/list", None),
            ("GET", "/api/admin/list_options", None),
            ("POST", "/api/admin/reload_config", {"filename": "fx-q8_0.gguf"}),
        ]
        for method, path, body in changes:
            wrong = {"Authorization": "Bearer wrong"}
            for headers in ([user] if "admin_key" in keys else []) + [wrong]:
                r = c.request(method, path, json=body, headers=headers)
                if r.status_code == 401 and "api_key" in keys and headers is wrong:
                    continue     # refused by the API key check already
                assert r.status_code == 401, (method, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                if path.startswith("/v1/"):
                    assert r.json()["error"]["type"] == "authentication_error"
                else:
                    assert r.json()["detail"]["type"] == "unauthorized"
            assert mgr.loaded_name is None, "a refused request changed the model"
        if "api_key" in keys:   # /v1/models answers without the key, masked: no library names either
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["protected-model"]
            assert len(c.get("/v1/models", headers=user).json()["data"]) == 4
        # Reading is allowed with the API key alone.
        assert c.post("/api/v1/model", json={"action": "list"}, headers=user).status_code == 200
        assert c.get("/v1/internal/model/info", headers=user).status_code == 200
        # With the admin key every change goes through.
        r = c.post("/api/v1/model", json={"action": "load", "model_name": "fx-q8_0.gguf"}, headers=as_admin)
        assert "result" in r.json() and mgr.loaded_name == "fx-q8_0.gguf"
        assert c.post("/v1/internal/model/unload", headers=as_admin).json() is None
        assert mgr.loaded_name is None
        assert c.post("/v1/internal/model/load", json={"model_name": "fx-q2_K.ggmlv3.bin"},
                      headers=as_admin).json() == "OK"
        assert mgr.loaded_name == "fx-q2_K.ggmlv3.bin"


# ---------------------------------------------------------------- refusals and failures

def test_refused_load_through_each_protocol(library_dir):
    settings = Settings(model_dir=str(library_dir), n_ctx=256)
    mem = {"bytes": 1 << 50}
    mgr = ModelManager(settings, mem_available=lambda: mem["bytes"],
                       engine_factory=lambda e, s, p: (ScriptedEngine(e.name), None))
    lib = {e.name: e for e in mgr.library.scan()}
    need_f16 = lib["fxgqa-f16.gguf"].ram_for(256)
    mem["bytes"] = (lib["fx-q8_0.gguf"].ram_for(256) + need_f16) // 2     # q8_0 and q2_K fit, f16 does not
    want = [f"{need_f16 / GB:.1f} GB", f"{mem['bytes'] / GB:.1f} GB", "fx-q8_0.gguf", "fx-q2_K.ggmlv3.bin"]
    with client_for(mgr, settings) as c:
        r = c.post("/api/v1/model", json={"action": "load", "model_name": "fxgqa-f16.gguf"})
        assert r.status_code == 200 and "error" in r.json()        # text-generation-webui's failure shape
        msg = r.json()["error"]["message"]
        assert "InsufficientMemory" in msg and all(w in msg for w in want), msg

        r = c.post("/v1/internal/model/load", json={"model_name": "fxgqa-f16.gguf"})
        assert r.status_code == 400 and r.json()["detail"].startswith("Failed to load the model.")
        assert all(w in r.json()["detail"] for w in want)

        r = c.post("/api/admin/reload_config", json={"filename": "fxgqa-f16.gguf"})
        assert r.status_code == 400 and r.json()["success"] is False
        assert all(w in r.json()["detail"] for w in want)
        assert mgr.loaded_name is None

        # Running from disk is the caller's explicit choice.
        r = c.post("/v1/internal/model/load", json={"model_name": "fxgqa-f16.gguf", "args": {"allow_disk": True}})
        assert r.json() == "OK" and mgr.loaded_name == "fxgqa-f16.gguf"


def test_bad_requests_and_bad_files(library_dir):
    (library_dir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    mgr, settings, _ = scripted_manager(library_dir)
    with client_for(mgr, settings) as c:
        c.post("/api/v1/model", json={"action": "load", "model_name": "fx-q8_0.gguf"})
        # The broken file is not offered, and loading it fails with a reason while the old model keeps serving.
        assert "broken.gguf" not in c.get("/v1/internal/model/list").json()["model_names"]
        r = c.post("/v1/internal/model/load", json={"model_name": "broken.gguf"})
        assert r.status_code == 400 and "broken.gguf" in r.json()["detail"]
        no_paths(r, library_dir)
        assert mgr.loaded_name == "fx-q8_0.gguf"
        r = c.post("/api/v1/generate", json={"prompt": "x", "max_length": 8})
        assert r.json()["results"][0]["text"] == "fx-q8_0.gguf:x"
        # Unknown names cannot reach the file system.
        for name in ("../../etc/passwd", "/etc/hostname", "nope.gguf"):
            r = c.post("/v1/internal/model/load", json={"model_name": name})
            assert r.status_code == 400 and "no model named" in r.json()["detail"]
        # Wrong types are a field error.
        for args in ({"n_ctx": "big"}, {"n_ctx": -5}, {"threads": 1.5}, {"no_mmap": "maybe"}, "n_ctx=5"):
            r = c.post("/v1/internal/model/load", json={"model_name": "fx-q2_K.ggmlv3.bin", "args": args})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (args, r.text)
        r = c.post("/v1/internal/model/load", json={"model_name": 5})
        assert r.status_code == 400
        r = c.post("/api/admin/reload_config", json={})
        assert r.status_code == 400 and "filename" in r.text
        assert mgr.loaded_name == "fx-q8_0.gguf"


# ---------------------------------------------------------------- a load racing with a streaming request

def _sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


def test_switch_waits_for_a_stream_and_queues_new_requests(library_dir):
    mgr, settings, built = scripted_manager(library_dir, admin_key="adm")
    admin = {"Authorization": "Bearer adm"}
    with client_for(mgr, settings) as c:
        assert c.post("/api/admin/reload_config", json={"filename": "fx-q2_K.ggmlv3.bin"},
                      headers=admin).json() == {"success": True}
        _wait_loaded(c, mgr, "fx-q2_K.ggmlv3.bin")
        old = built["fx-q2_K.ggmlv3.bin"]
        old.gate = threading.Semaphore(1)             # the stream's first event may pass, then it is held

        stream = {}

        def read_stream():
            r = c.post("/api/extra/generate/stream", json={"prompt": "old", "max_length": 8})
            stream["status"], stream["events"] = r.status_code, _sse_events(r.text)

        t_stream = threading.Thread(target=read_stream, daemon=True)
        t_stream.start()
        assert old.started.wait(TIMEOUT)

        r = c.post("/api/admin/reload_config", json={"filename": "fx-q8_0.gguf"}, headers=admin)
        assert r.json() == {"success": True}           # answered at once; the switch waits for the stream
        status = c.get("/api/admin/load_status").json()
        assert status["loading"] == "fx-q8_0.gguf" and status["loaded"] == "fx-q2_K.ggmlv3.bin"

        late = {}

        def late_request():
            r = c.post("/api/v1/generate", json={"prompt": "new", "max_length": 8})
            late["status"], late["body"] = r.status_code, r.json()

        t_late = threading.Thread(target=late_request, daemon=True)
        t_late.start()
        settle(mgr, lambda: mgr._waiting == 1)       # in line behind the load, which waits for the stream
        assert t_stream.is_alive() and t_late.is_alive()
        assert "fx-q8_0.gguf" not in built, "the new model is not built while the old one streams"
        # A second switch while one is under way is refused as busy.
        r = c.post("/api/admin/reload_config", json={"filename": "fxgqa-f16.gguf"}, headers=admin)
        assert r.status_code == 503 and r.json()["success"] is False

        old.gate.release(10)                          # let the old stream run to its end
        t_stream.join(TIMEOUT)
        t_late.join(TIMEOUT)
        assert stream["status"] == 200
        assert "".join(e["token"] for e in stream["events"]) == "fx-q2_K.ggmlv3.bin:old"
        assert stream["events"][-1]["finish_reason"] == "length"      # finished, not cut off
        assert late["status"] == 200
        assert late["body"]["results"][0]["text"] == "fx-q8_0.gguf:new"
        assert c.get("/api/v1/model").json() == {"result": "koboldcpp/fx-q8_0"}
        status = c.get("/api/admin/load_status").json()
        assert status == {"loaded": "fx-q8_0.gguf", "loading": None, "progress": 1.0, "last_error": None}


def test_switch_proceeds_when_the_client_aborts_its_stream(library_dir):
    mgr, settings, built = scripted_manager(library_dir)
    mgr.load("fx-q2_K.ggmlv3.bin")
    with client_for(mgr, settings) as c:
        old = built["fx-q2_K.ggmlv3.bin"]
        old.gate = threading.Semaphore(1)
        stream = {}

        def read_stream():
            r = c.post("/api/extra/generate/stream", json={"prompt": "old", "genkey": "KCPP4321"})
            stream["events"] = _sse_events(r.text)

        t_stream = threading.Thread(target=read_stream, daemon=True)
        t_stream.start()
        assert old.started.wait(TIMEOUT)
        assert c.post("/api/admin/reload_config", json={"filename": "fx-q8_0.gguf"}).json() == {"success": True}
        settle(mgr, lambda: mgr._cond.waiting == 1)     # the load waits for the stream to end
        assert mgr.loaded_name == "fx-q2_K.ggmlv3.bin", "the switch waits for the stream"
        assert c.post("/api/extra/abort", json={"genkey": "KCPP4321"}).json()["success"] == "true"
        t_stream.join(TIMEOUT)
        assert not t_stream.is_alive()
        assert "".join(e["token"] for e in stream["events"]) != "fx-q2_K.ggmlv3.bin:old"   # cut short
        _wait_loaded(c, mgr, "fx-q8_0.gguf")
        assert c.post("/api/v1/generate", json={"prompt": "n"}).json()["results"][0]["text"] == "fx-q8_0.gguf:n"


# ---------------------------------------------------------------- the real engine, through every protocol

def _real_manager(library_dir, fixture_index):
    settings = Settings(model_dir=str(library_dir), n_ctx=128, n_threads=1)
    models = {m["name"]: m for m in fixture_index["models"]}
    return watched(ModelManager(settings)), settings, models


def _expected_text(c, first_token: int) -> str:
    return c.post("/api/extra/detokenize", json={"ids": [first_token]}).json()["result"]


PROMPT = "The quick brown fox jumps over the lazy dog. Once"   # the fixtures' prompt (tokens in index.json)
SWITCHES = [("fx-q2_K.ggmlv3.bin", "fx-q2_K"), ("fxgqa-f16.gguf", "fxgqa-f16"), ("fx-q2_K.ggmlv3.bin", "fx-q2_K")]


def test_textgen_legacy_load_generate_switch_generate(library_dir, fixture_index):
    mgr, settings, models = _real_manager(library_dir, fixture_index)
    with client_for(mgr, settings) as c:
        for name, model in SWITCHES:
            r = c.post("/api/v1/model", json={"action": "load", "model_name": name, "args": {"n_ctx": 128}})
            assert mgr.loaded_name == name, r.text
            assert r.json()["result"]["shared.settings"]["truncation_length"] == 128
            tokens = c.post("/api/v1/token-count", json={"prompt": PROMPT}).json()
            assert tokens["results"][0]["tokens"] == len(models[model]["tokens"])
            r = c.post("/api/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1, "do_sample": False,
                                                 "top_k": 1, "repetition_penalty": 1.0})
            assert r.json()["results"][0]["text"] == _expected_text(c, models[model]["greedy"][0])
        c.post("/api/v1/model", json={"action": "unload"})
        assert c.post("/api/v1/model", json={"action": "info"}).json()["result"]["model_name"] == "None"


def test_openai_style_load_generate_switch_generate(library_dir, fixture_index):
    mgr, settings, models = _real_manager(library_dir, fixture_index)
    with client_for(mgr, settings) as c:
        for name, model in SWITCHES:
            assert c.post("/v1/internal/model/load", json={"model_name": name}).json() == "OK"
            # /v1/models: the served model first, then the rest of the library.
            ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
            assert ids[0] == name and sorted(ids[1:]) == sorted(
                n for n in ("fx-q2_K.ggmlv3.bin", "fx-q8_0.gguf", "fxgqa-f16.gguf") if n != name)
            assert c.get(f"/v1/models/{ids[1]}").json()["id"] == ids[1]
            assert c.get("/v1/internal/model/info").json()["model_name"] == name
            assert mgr.model_info()["n_vocab"] == models[model]["hparams"]["n_vocab"]
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == _expected_text(c, models[model]["greedy"][0])
        # Context size and template of a load apply to the next request of every protocol.
        r = c.post("/v1/internal/model/load", json={"model_name": "fxgqa-f16.gguf",
                                                    "args": {"n_ctx": 64, "instruction_template": "vicuna"}})
        assert r.json() == "OK"
        assert mgr.model_info()["template"] == "vicuna"
        assert c.get("/api/extra/true_max_context_length").json()["value"] == 64
        n_prompt = c.post("/api/extra/tokencount", json={"prompt": "word " * 80}).json()["value"]
        r = c.post("/v1/completions", json={"prompt": "word " * 80, "max_tokens": 1})
        assert n_prompt > 64 and r.json()["usage"]["total_tokens"] == 64, "the prompt is cut to the new context"
        assert c.post("/v1/internal/model/unload").json() is None
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        assert r.status_code == 503


def test_kobold_admin_load_generate_switch_generate(library_dir, fixture_index):
    mgr, settings, models = _real_manager(library_dir, fixture_index)
    with client_for(mgr, settings) as c:
        for name, model in SWITCHES:
            assert c.post("/api/admin/reload_config", json={"filename": name}).json() == {"success": True}
            assert _wait_loaded(c, mgr, name)["last_error"] is None
            assert c.get("/api/v1/model").json() == {"result": "koboldcpp/" + Path(name).stem}
            r = c.post("/api/v1/generate", json={"prompt": PROMPT, "max_length": 1, "top_k": 1, "rep_pen": 1.0,
                                                 "temperature": 0.0})
            assert r.json()["results"][0]["text"] == _expected_text(c, models[model]["greedy"][0])
        assert c.post("/api/admin/reload_config", json={"filename": "unload_model"}).json() == {"success": True}
        assert c.get("/api/v1/model").json() == {"result": "ReadOnly"}


# ---------------------------------------------------------------- `serve` wiring

def test_serve_hands_the_server_a_manager_over_the_library(library_dir, fixtures_dir):
    """`serve --model-dir DIR --model NAME` (and `--model FILE` outside the folder) with the default plugins."""
    from airobackend.commands.serve import open_engine

    settings = Settings(model_dir=str(library_dir), model="fx-q8_0.gguf", n_ctx=128, n_threads=1)
    manager, load, demo = open_engine(settings)
    assert manager.loaded_name is None          # ports are checked before the load
    load()
    assert not demo and manager.loaded_name == "fx-q8_0.gguf"
    with TestClient(create_app(manager, settings)) as c:
        assert c.get("/api/admin/list_options").json() == [
            "initial_model", "unload_model", "fx-q2_K.ggmlv3.bin", "fx-q8_0.gguf", "fxgqa-f16.gguf"]
        assert c.get("/api/v1/model").json() == {"result": "koboldcpp/fx-q8_0"}
        assert c.get("/v1/internal/model/list").json()["model_names"] == [
            "fx-q2_K.ggmlv3.bin", "fx-q8_0.gguf", "fxgqa-f16.gguf"]

    outside = fixtures_dir / "models" / "fx-q4_0.ggmlv3.bin"
    settings = Settings(model_dir=str(library_dir), model=str(outside), n_ctx=128, n_threads=1)
    manager, load, _ = open_engine(settings)
    load()
    assert manager.loaded_name == "fx-q4_0.ggmlv3.bin"
    assert "fx-q4_0.ggmlv3.bin" in [m["name"] for m in manager.list_models()]
