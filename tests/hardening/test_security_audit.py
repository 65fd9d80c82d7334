"""Security audit, complementing tests/server/test_server_security.py.

That file checks the listed routes, the 401 shapes, CORS and the caps on a scripted engine. This one audits what the
served app actually contains, so that a route added later cannot slip through:

- every route of the full app (all built-in adapters, incl. the model library routes of a real ModelManager), every
  method, path-parameter routes and WebSocket routes included, answers 401 without the key, except the documented
  public probes; the public probes themselves never show the model's name or any file system path;
- the real `serve` process binds 127.0.0.1 (both the main port and text-generation-webui's streaming port) when no
  --host is given, and its WebSockets on both ports refuse a missing key;
- with --cors restricting origins, a WebSocket opened from another origin is refused (browsers apply no CORS to
  WebSockets, so the server has to check the Origin itself);
- `serve` warns when it listens beyond loopback without a key (checked through main(), without binding anything);
- no answer to an unauthenticated client (no key configured: every client) carries the model library's folder, on
  any route, errors included.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import websockets
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.sync.client import connect as ws_connect

from airobackend.manager import ModelManager
from airobackend.plugins import get_plugin_manager
from airobackend.server import PUBLIC_ROUTES, create_app
from airobackend.settings import Settings

from hardening_support import REPO, ServerProcess, free_port, listening_addresses

KEY = "hardening-key"
MODEL = "airoboros-65b-gpt4-1.4.ggmlv3.q4_K_M-demo.gguf"
AUTH = {"Authorization": f"Bearer {KEY}"}

# What may answer without the key, and why (KoboldCpp 1.76 with --password answers these; `koboldcpp.py`,
# `secure_endpoint`):
ALLOWED_PUBLIC = {
    ("GET", "/health"): "liveness probe",
    ("GET", "/"): "the index page (no model facts without the key)",
    ("GET", "/docs"): "the OpenAPI page",
    ("GET", "/docs/oauth2-redirect"): "a static helper page of Swagger UI",
    ("GET", "/openapi.json"): "the OpenAPI document",
    ("GET", "/api"): "KoboldAI's API index",
    ("GET", "/api/v1/model"): "Lite/ST connect probe: answers with the name masked",
    ("GET", "/api/v1/info/version"): "United version probe",
    ("GET", "/api/extra/version"): "KoboldCpp detection; says protected: true",
    ("GET", "/api/v1/config/max_length"): "Lite probe",
    ("GET", "/api/v1/config/max_context_length"): "Lite probe",
    ("GET", "/api/extra/true_max_context_length"): "Lite probe",
    ("GET", "/api/extra/preloadstory"): "Lite probe",
    ("GET", "/sdapi/v1/sd-models"): "Lite probe (image generation: none)",
    ("GET", "/v1/models"): "OpenAI model list: names masked",
}


@pytest.fixture(scope="module")
def library(tmp_path_factory, demo_model) -> Path:
    lib = tmp_path_factory.mktemp("secret-folder") / "models"
    lib.mkdir()
    shutil.copyfile(demo_model, lib / MODEL)
    return lib


@pytest.fixture(scope="module")
def manager(library) -> ModelManager:
    m = ModelManager(Settings(model_dir=str(library), n_ctx=128, multiuser=8))
    m.load(MODEL)
    return m


def full_app(manager, **kw):
    settings = Settings(model_dir=manager.settings.model_dir, n_ctx=128, multiuser=8, textgen_stream_port=0, **kw)
    return create_app(manager, settings, get_plugin_manager(load_entrypoints=False))


def first_event(ws) -> str:
    """Send a small request and read its messages to stream_end; the first message's event."""
    ws.send_text(json.dumps({"prompt": "x", "user_input": "x", "max_new_tokens": 2}))
    msgs = []
    while not msgs or msgs[-1]["event"] != "stream_end":
        msgs.append(ws.receive_json())
    return msgs[0]["event"] if msgs[0]["event"] != "error" else f"error: {msgs[0]['message']}"


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_public_routes_are_exactly_the_documented_probes():
    assert set(PUBLIC_ROUTES) <= set(ALLOWED_PUBLIC), set(PUBLIC_ROUTES) - set(ALLOWED_PUBLIC)


def test_every_served_route_and_websocket_needs_the_key(manager):
    app = full_app(manager, api_key=KEY)
    c = TestClient(app, raise_server_exceptions=False)
    http_routes = ws_routes = 0
    for route in app.routes:
        path = concrete(route.path)
        if isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            ws_routes += 1
            with pytest.raises(WebSocketDenialResponse) as e:
                with c.websocket_connect(path):
                    pass
            assert e.value.status_code == 401, route.path
            with c.websocket_connect(path, headers=dict(AUTH)) as ws:    # the key opens it
                assert first_event(ws) == "text_stream"
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method in ("HEAD", "OPTIONS"):       # answered by the guard for any path, nothing computed
                continue
            http_routes += 1
            r = c.request(method, path, json={})
            if (method, route.path) in PUBLIC_ROUTES:
                assert r.status_code != 401, (method, route.path)
                continue
            assert r.status_code == 401, (method, route.path, r.status_code)
            want = "error" if path.startswith("/v1/") or path == "/v1" else "detail"
            assert want in r.json(), (method, route.path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert http_routes > 40 and ws_routes >= 2          # (so the loop saw the whole app)
    # the model-library routes are among them
    assert c.get("/v1/internal/model/list").status_code == 401
    assert c.post("/api/admin/reload_config", json={"filename": "x"}).status_code == 401


def test_public_probes_mask_the_model_and_show_no_paths(manager, library):
    app = full_app(manager, api_key=KEY)
    c = TestClient(app)
    secret_name = "airoboros-65b-gpt4-1.4"
    for method, path in sorted(PUBLIC_ROUTES):
        r = c.request(method, path)
        assert r.status_code == 200, path
        assert secret_name not in r.text, f"{path} shows the loaded model to a client without the key"
        assert str(library) not in r.text and str(library.parent) not in r.text, path
    assert c.get("/api/extra/version").json()["protected"] is True
    # with the key, the name is there (so the masking above is real)
    assert secret_name in c.get("/api/v1/model", headers=AUTH).text


def _all_requests(c: TestClient, app):
    """Every route with {} and with a plausible body, plus the classic error paths; yields responses."""
    bodies = [{}, {"prompt": "hi", "max_length": 2, "max_tokens": 2}, {"action": "info"}, {"action": "list"},
              {"action": "load", "model_name": "../../etc/passwd"}, {"model_name": "nope.gguf"},
              {"filename": "missing.bin"}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}]
    for route in app.routes:
        path = concrete(route.path)
        if isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            with c.websocket_connect(path) as ws:
                ws.send_text("{not json")
                yield ws.receive_text()
                ws.send_text(json.dumps({"prompt": "hi", "max_new_tokens": 2, "model": "/etc/passwd"}))
                while True:
                    msg = ws.receive_text()
                    yield msg
                    if json.loads(msg)["event"] == "stream_end":
                        break
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "GET":
                yield c.get(path)
            elif method == "POST":
                for body in bodies:
                    yield c.post(path, json=body)
                yield c.post(path, content=b"{broken")
    for path in ("/nope", "/api/v1/nope", "/v1/nope", "/v1/models/nope", "/api/v1/model/../../etc"):
        yield c.get(path)


def test_no_answer_shows_the_library_folder(manager, library):
    app = full_app(manager)                 # no key: every client is unauthenticated
    c = TestClient(app, raise_server_exceptions=False)
    n = 0
    secrets = (str(library), str(library.parent), str(Path.home() / ".cache"), str(REPO))
    for resp in _all_requests(c, app):
        n += 1
        text = resp if isinstance(resp, str) else resp.text + json.dumps(dict(resp.headers))
        for s in secrets:
            assert s not in text, (getattr(resp, "url", "ws"), s, text[:300])
        if not isinstance(resp, str):
            assert resp.status_code < 500, (resp.url, resp.text[:300])
        if manager.loaded_name is None:      # an unload route ran: the rest should see a model again
            manager.load(MODEL)
    assert n > 150


@pytest.mark.e2e       # `airobackend serve` as a subprocess
@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads the listening sockets from /proc (Linux)")
def test_real_server_binds_loopback_and_guards_both_ports(tmp_path, demo_model):
    ws_port = free_port()
    with ServerProcess(tmp_path, "--model", str(demo_model), "--api-key", KEY, host=None,
                       env={"AIRO_TEXTGEN_STREAM_PORT": str(ws_port)}) as srv:
        for port in (srv.port, ws_port):
            addrs = listening_addresses(srv.pid, port)
            assert addrs, port
            # 127.0.0.1 (/proc/net/tcp stores it little-endian) or ::1; never 0.0.0.0 / ::
            assert set(addrs) <= {"0100007F", "00000000000000000000000001000000"}, (port, addrs)
        assert httpx.post(srv.url + "/api/v1/generate", json={"prompt": "x"}).status_code == 401
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}).json()["error"]["type"] == \
            "authentication_error"
        for port in (srv.port, ws_port):
            with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                with ws_connect(f"ws://127.0.0.1:{port}/api/v1/stream"):
                    pass
            assert e.value.response.status_code == 401
            with ws_connect(f"ws://127.0.0.1:{port}/api/v1/stream", additional_headers=AUTH) as ws:
                ws.send(json.dumps({"prompt": "x", "max_new_tokens": 2}))
                assert json.loads(ws.recv(timeout=60))["event"] == "text_stream"
    assert "without an API key" not in srv.stderr_text()


def test_websocket_from_a_disallowed_origin_is_refused(manager):
    c = TestClient(full_app(manager, cors="http://good.example"))
    with pytest.raises(WebSocketDenialResponse) as e:
        with c.websocket_connect("/api/v1/stream", headers={"Origin": "http://evil.example"}):
            pass
    assert e.value.status_code == 403
    for headers in ({"Origin": "http://good.example"}, {}):   # the allowed origin, and non-browser clients
        with c.websocket_connect("/api/v1/stream", headers=headers) as ws:
            assert first_event(ws) == "text_stream"
    # by default any origin may (KoboldCpp, text-generation-webui and llama.cpp allow any)
    c = TestClient(full_app(manager))
    with c.websocket_connect("/api/v1/stream", headers={"Origin": "http://evil.example"}) as ws:
        assert first_event(ws) == "text_stream"


def test_serve_warns_when_listening_beyond_loopback_without_a_key(monkeypatch, caplog):
    """Through serve.main(), with loading and listening stubbed out (nothing is bound)."""
    import argparse

    import airobackend.server as server
    from airobackend.commands import serve
    from fakes import scripted_engine

    started = []

    async def fake_serve(app, settings, ready=None):
        started.append(settings.host)

    monkeypatch.setattr(serve, "open_engine", lambda settings: (scripted_engine()[0], lambda: None, False))
    monkeypatch.setattr(server, "serve_async", fake_serve)
    monkeypatch.setattr(server, "check_ports", lambda app, settings: None)

    def run(*argv):
        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="airobackend.serve"):
            assert serve.main(parser.parse_args(list(argv))) == 0
        return [r.getMessage() for r in caplog.records if r.name == "airobackend.serve"]

    for k in [k for k in os.environ if k.startswith("AIRO_")]:
        monkeypatch.delenv(k)
    assert any("without an API key" in m for m in run("--host", "0.0.0.0"))
    assert not any("without an API key" in m for m in run("--host", "0.0.0.0", "--api-key", "k"))
    assert not any("without an API key" in m for m in run())                  # default: 127.0.0.1
    assert started == ["0.0.0.0", "0.0.0.0", "127.0.0.1"]


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_websocket_cannot_pile_up_requests_ahead_of_their_answers():
    """One socket may send a few requests ahead (answered in order); a flood is closed with 1008, not buffered."""
    from fakes import live, make_app, scripted_engine

    engine, model = scripted_engine("abcdef", delay=0.01, multiuser=2)
    with live(make_app(engine, max_body_bytes=100_000)) as srv:
        with ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
            for i in range(3):
                ws.send(json.dumps({"prompt": f"p{i}", "max_new_tokens": 4}))
            texts = []
            for i in range(3):
                parts = []
                while (m := json.loads(ws.recv(timeout=10)))["event"] != "stream_end":
                    parts.append(m["text"])
                texts.append("".join(parts))
            assert texts == ["abcd"] * 3
        with ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
            big = json.dumps({"prompt": "x" * 20_000, "max_new_tokens": 50})
            with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                for _ in range(50):
                    ws.send(big)
                while True:
                    ws.recv(timeout=10)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1008
        # the flood's generation was aborted and the server serves the next client
        assert httpx.post(srv.url + "/api/v1/generate", json={"prompt": "x", "max_length": 3},
                          timeout=10).json()["results"][0]["text"] == "abc"
