"""API key on every route (HTTP and WebSocket) with KoboldCpp's exceptions, CORS as llama.cpp's server answers it,
body caps, hostile bodies, and no model paths for unauthenticated clients."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
import websockets
from starlette.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from airobackend.adapters.kobold import kobold_model_name
from airobackend.commands.serve import security_warnings
from airobackend.server import PUBLIC_ROUTES
from airobackend.settings import Settings

from fakes import live, make_app, scripted_engine

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

PROTECTED = [
    ("POST", "/api/v1/generate", {"prompt": "x", "max_length": 2}),
    ("POST", "/api/extra/generate/stream", {"prompt": "x", "max_length": 2}),
    ("GET", "/api/extra/generate/check", None),
    ("POST", "/api/extra/generate/check", {}),
    ("POST", "/api/extra/abort", {}),
    ("POST", "/api/extra/tokencount", {"prompt": "x"}),
    ("POST", "/api/extra/tokenize", {"prompt": "x"}),
    ("POST", "/api/extra/detokenize", {"ids": [5]}),
    ("GET", "/api/extra/perf", None),
    ("POST", "/api/v1/chat", {"user_input": "x", "max_new_tokens": 2}),
    ("POST", "/api/v1/model", {"action": "info"}),
    ("POST", "/api/v1/token-count", {"prompt": "x"}),
    ("POST", "/api/v1/stop-stream", {}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ("POST", "/v1/internal/encode", {"text": "x"}),
    ("POST", "/v1/internal/decode", {"tokens": [5]}),
    ("POST", "/v1/internal/token-count", {"text": "x"}),
    ("GET", "/v1/internal/model/info", None),
    ("POST", "/v1/internal/stop-generation", {}),
]


@pytest.fixture
def keyed(demo_engine):
    return TestClient(make_app(demo_engine, api_key=KEY))


@pytest.mark.parametrize("method,path,body", PROTECTED)
def test_every_route_needs_the_key(keyed, method, path, body):
    r = keyed.request(method, path, json=body)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    if path.startswith("/v1/"):
        assert r.json() == {"error": {"message": "Invalid API Key", "type": "authentication_error", "param": None,
                                      "code": "invalid_api_key"}}
    else:
        assert r.json() == {"detail": {"error": "Unauthorized", "msg": "Authentication key is missing or invalid.",
                                       "type": "unauthorized"}}
    wrong = keyed.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = keyed.request(method, path, json=body, headers=AUTH)
    assert ok.status_code == 200, ok.text


def test_probes_answer_without_the_key_as_koboldcpp_does(keyed, demo_engine):
    assert keyed.get("/api/v1/model").json() == {"result": "koboldcpp/protected-model"}
    assert keyed.get("/api/v1/model", headers=AUTH).json() == \
        {"result": "koboldcpp/" + kobold_model_name(demo_engine.model_info()["name"])}
    assert keyed.get("/api/extra/version").json()["protected"] is True   # Lite then asks the user for the key
    assert keyed.get("/api/v1/info/version").status_code == 200
    assert keyed.get("/v1/models").json()["data"][0]["id"] == "protected-model"
    assert keyed.get("/health").json() == {"status": "ok"}
    assert keyed.get("/openapi.json").status_code == 200
    # the API documentation works without the key, from files served here
    assert "/docs/assets/swagger-ui-bundle.js" in keyed.get("/docs").text
    assert keyed.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert keyed.get("/docs/assets/../../api/extra/perf").status_code in (401, 404)


def test_every_registered_route_is_protected_or_a_known_probe(demo_engine):
    app = make_app(demo_engine, api_key=KEY)
    c = TestClient(app)
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "HEAD" or "{" in route.path:
                continue
            r = c.request(method, route.path, json={})
            if (method, route.path) in PUBLIC_ROUTES or route.path.startswith("/docs"):
                assert r.status_code != 401, route.path
            else:
                assert r.status_code == 401, (method, route.path)


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_websockets_need_the_key(demo_engine):
    app = make_app(demo_engine, api_key=KEY)
    c = TestClient(app)
    with pytest.raises(WebSocketDenialResponse) as e:
        with c.websocket_connect("/api/v1/stream"):
            pass
    assert e.value.status_code == 401
    with c.websocket_connect("/api/v1/stream", headers=dict(AUTH)) as ws:   # (TestClient adds to the dict)
        ws.send_text('{"prompt": "x", "max_new_tokens": 2}')
        assert ws.receive_json()["event"] == "text_stream"
    with live(app) as srv:
        async def attempt(uri, headers=None):
            async with websockets.connect(uri, additional_headers=headers) as ws:
                await ws.send('{"prompt": "x", "max_new_tokens": 2}')
                return json.loads(await ws.recv())
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            asyncio.run(attempt(f"ws://127.0.0.1:{srv.port}/api/v1/chat-stream"))
        assert e.value.response.status_code == 401
        assert asyncio.run(attempt(f"ws://127.0.0.1:{srv.port}/api/v1/stream", AUTH))["event"] == "text_stream"
        # browsers cannot send headers on a WebSocket: the key may come as a query parameter
        assert asyncio.run(attempt(f"ws://127.0.0.1:{srv.port}/api/v1/stream?api_key={KEY}"))["event"] == \
            "text_stream"


def test_admin_key_guards_model_loading(demo_model):
    from airobackend.manager import ModelManager

    manager = ModelManager(Settings(n_ctx=64))
    name = manager.register(demo_model)
    manager.load(name)
    c = TestClient(make_app(manager, api_key=KEY, admin_key="admin!", n_ctx=64))
    r = c.post("/api/v1/model", json={"action": "unload"}, headers=AUTH)
    assert r.status_code == 401 and r.json()["detail"]["type"] == "unauthorized"
    assert manager.loaded_name == name
    r = c.post("/api/v1/model", json={"action": "unload"}, headers={"Authorization": "Bearer admin!"})
    assert r.status_code == 200 and r.json()["result"]["model_name"] == "None"
    assert manager.loaded_name is None
    assert c.post("/api/v1/model", json={"action": "info"}, headers=AUTH).status_code == 200


def test_cors_preflight_and_headers_default_any_origin(demo_engine):
    # Any page may generate (KoboldCpp answers `*`): the origin is never echoed and credentials never allowed.
    c = TestClient(make_app(demo_engine, api_key=KEY))
    r = c.options("/api/v1/generate", headers={"Origin": "https://lite.koboldai.net",
                                                "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200 and r.content == b""           # preflights need no key (browsers send none)
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["access-control-allow-methods"] == "GET, POST"
    assert "authorization" in r.headers["access-control-allow-headers"]
    # every answer carries it, errors included
    for resp in (c.get("/api/extra/version", headers={"Origin": "http://a.example"}),
                 c.post("/api/v1/generate", json={}, headers={"Origin": "http://a.example"}),
                 c.post("/v1/completions", content=b"{", headers={"Origin": "http://a.example", **AUTH})):
        assert resp.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in resp.headers
    assert c.get("/api/extra/version").headers["access-control-allow-origin"] == "*"


def test_cors_can_be_restricted(demo_engine):
    c = TestClient(make_app(demo_engine, cors="http://good.example, http://also.example"))
    pre = {"Access-Control-Request-Method": "POST"}
    r = c.options("/v1/completions", headers={"Origin": "http://good.example", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
    assert r.headers["access-control-allow-credentials"] == "true" and r.headers["vary"] == "Origin"
    r = c.options("/v1/completions", headers={"Origin": "http://evil.example", **pre})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = c.get("/api/extra/version", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert c.get("/api/extra/version", headers={"Origin": "http://also.example"}).headers[
        "access-control-allow-origin"] == "http://also.example"


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_body_cap(demo_engine):
    engine = demo_engine
    c = TestClient(make_app(engine, max_body_bytes=1000))
    big = json.dumps({"prompt": "x" * 2000})
    r = c.post("/api/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"]["type"] == "bad_input"
    r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():                      # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 200
    app = make_app(engine, max_body_bytes=1000)
    with live(app) as srv:
        r = httpx.post(srv.url + "/api/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.post(srv.url + "/api/v1/generate", json={"prompt": "x", "max_length": 2}).status_code == 200


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00", b'{"prompt": Infinity}', b""])
def test_hostile_bodies_get_error_shapes_and_the_server_keeps_serving(raw, demo_engine):
    c = TestClient(make_app(demo_engine))
    for path, key in (("/api/v1/generate", "detail"), ("/api/extra/generate/stream", "detail"),
                      ("/v1/completions", "error"), ("/v1/chat/completions", "error"),
                      ("/api/v1/chat", "detail"), ("/api/extra/tokencount", "detail")):
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, raw, r.text)
        assert key in r.json()
    r = c.post("/api/v1/generate", json={"prompt": "x", "max_length": 3})
    assert r.status_code == 200


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_oversized_headers_are_refused(demo_engine):
    with live(make_app(demo_engine)) as srv:
        r = httpx.get(srv.url + "/api/extra/version", headers={"X-Big": "y" * 64 * 1024})
        assert r.status_code in (400, 431)
        assert httpx.get(srv.url + "/api/extra/version").status_code == 200


def test_model_paths_never_reach_unauthenticated_clients(demo_engine):
    folder = str(Path(demo_engine.model_info()["path"]).parent)
    app = make_app(demo_engine, api_key=KEY)
    c = TestClient(app)
    for route in app.routes:
        if "GET" in (getattr(route, "methods", None) or ()) and "{" not in route.path:
            assert folder not in c.get(route.path).text, route.path
    c = TestClient(make_app(demo_engine))      # even with no key, no route shows the file system path
    for route in app.routes:
        if "GET" in (getattr(route, "methods", None) or ()) and "{" not in route.path:
            assert folder not in c.get(route.path).text, route.path
    for action in ("info", "list"):
        assert folder not in c.post("/api/v1/model", json={"action": action}).text
    assert folder not in c.post("/api/v1/model", json={"action": "load", "model_name": "../../etc/passwd"}).text


def test_warning_when_listening_beyond_loopback_without_a_key():
    # it says what is exposed: generation, and whether admin actions are too
    (warning,) = security_warnings(Settings(host="0.0.0.0"))
    assert "API key" in warning and "generate" in warning and "switching models" in warning
    (warning,) = security_warnings(Settings(host="192.168.1.5", admin_key="adm"))
    assert "generate" in warning and "admin actions (loading, unloading and switching models) need the admin key" \
        in warning
    # slot save/restore writes files: named where it exists (with a prompt-cache folder)
    (warning,) = security_warnings(Settings(host="0.0.0.0", prompt_cache_dir="/srv/kv"))
    assert "saving and restoring slots (files in /srv/kv) (set --admin-key" in warning
    (warning,) = security_warnings(Settings(host="0.0.0.0", admin_key="adm", prompt_cache_dir="/srv/kv"))
    assert "switching models, saving and restoring slots (files in /srv/kv)) need the admin key" in warning
    assert security_warnings(Settings(host="0.0.0.0", api_key="k")) == []
    assert security_warnings(Settings(host="127.0.0.1")) == []
    assert security_warnings(Settings(host="localhost")) == []
    assert security_warnings(Settings(host="::1")) == []


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_websocket_messages_are_capped(demo_engine):
    with live(make_app(demo_engine, max_body_bytes=1000)) as srv:
        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
                await ws.send(json.dumps({"prompt": "x" * 5000}))
                with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                    await ws.recv()
                return e.value.rcvd.code
        assert asyncio.run(go()) == 1009            # "message too big"
        assert httpx.post(srv.url + "/api/v1/generate", json={"prompt": "x", "max_length": 1}).status_code == 200


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_connections_beyond_the_limit_get_503_and_the_server_keeps_serving(demo_engine):
    # Each connection may carry a body up to the cap, so their number is what bounds the server's memory.
    app = make_app(demo_engine, max_connections=3)   # uvicorn counts the asking connection too
    with live(app) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        try:
            for s in idle:                                   # two keep-alive connections held open
                s.sendall(b"GET /api/extra/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            r = httpx.get(srv.url + "/api/extra/version", timeout=10)
            assert r.status_code == 503
        finally:
            for s in idle:
                s.close()
        for _ in range(50):                                  # the slots free as the connections close
            r = httpx.get(srv.url + "/api/extra/version", timeout=10)
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert r.status_code == 200 and r.json()["result"] == "KoboldCpp"


# ---------------------------------------------------------------------------------------------- internal hand-over

def test_a_client_cannot_replace_the_prompt_or_grammar_through_internal_keys():
    """A route hands its rendered chat prompt and its own grammar to the adapters as hook arguments; keys in the
    client's JSON with the names those once had are ordinary unknown fields: ignored."""
    engine, _ = scripted_engine("abc")
    c = TestClient(make_app(engine))
    hijack = {"_airo_prompt": "X" * 300, "_airo_grammar": 'root ::= "zzz"'}
    prompt_tokens = len(engine.tokenize("Hi"))
    # text-generation-webui's streaming WebSocket: the body's prompt is what is evaluated
    with c.websocket_connect("/api/v1/stream") as ws:
        ws.send_text(json.dumps({"prompt": "Hi", "max_new_tokens": 3, **hijack}))
        text = ""
        while (m := ws.receive_json())["event"] == "text_stream":
            text += m["text"]
    assert text == "abc" and engine.perf()["last_input_count"] == prompt_tokens
    # OpenAI completions: no grammar is forced on the answer, the prompt is the body's
    r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, **hijack})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "abc"
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens
    # chat routes: the route's rendered messages, not the client's key
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                            **hijack})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abc"
    assert r.json()["usage"]["prompt_tokens"] == len(engine.tokenize(engine.format_chat(
        [{"role": "user", "content": "Hi"}])))
    # and the hook itself, as a third-party route would call it
    from airobackend.server import build_request
    app = make_app(engine)
    req = build_request(app.state.pm, "textgen", {"prompt": "Hi", **hijack}, app.state.settings, engine)
    assert req.prompt == "Hi" and req.sampling.grammar in (None, "")
    req = build_request(app.state.pm, "openai.completions", {"prompt": "Hi", **hijack}, app.state.settings, engine)
    assert req.prompt == "Hi" and req.sampling.grammar in (None, "")
