"""A web page the user has open cannot drive the server: admin actions refuse pages of other origins unless the
origin is listed with --cors and the key is presented; CORS never echoes an unlisted origin with credentials; a
loopback listener answers only loopback Host names (DNS rebinding), on HTTP and WebSocket, on both ports.

Browser-shaped requests are made here by hand (preflight + request with the headers a browser sends); the real
browser's behaviour is checked in test_browser.py.
"""
from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from airobackend.manager import ModelManager
from airobackend.plugins import get_plugin_manager
from airobackend.server import create_app, is_admin_route, serve_async
from airobackend.settings import Settings

from fakes import LIBRARY_MODELS as MODELS
from fakes import free_port, library_app, scripted_engine

EVIL = "https://evil.example"
TRUSTED = "https://trusted.example"


def admin_requests(app) -> list[tuple[str, str, dict | None]]:
    """One request per admin route, each one that would change or reveal something if it were accepted. Routes that
    another adapter adds later (with `dependencies=[ADMIN]`) are covered by a generic request to them."""
    known = [
        ("POST", "/api/v1/model", {"action": "load", "model_name": MODELS[1]}),
        ("POST", "/api/v1/model", {"action": "unload"}),
        ("POST", "/v1/internal/model/load", {"model_name": MODELS[1]}),
        ("POST", "/v1/internal/model/unload", None),
        ("GET", "/v1/internal/model/list", None),
        ("GET", "/api/admin/list_options", None),
        ("POST", "/api/admin/reload_config", {"filename": MODELS[1]}),
        ("POST", "/api/admin/reload_config", {"filename": "unload_model"}),
    ]
    covered = {(m, p) for m, p, _ in known}
    out = list(known)
    for route in app.routes:
        if not is_admin_route(route):
            continue
        for method in sorted(route.methods - {"HEAD"}):
            if (method, route.path) not in covered:      # e.g. POST /slots/{id_slot}: parameters filled with 0
                path = route.path
                for name in route.param_convertors:
                    path = path.replace("{" + name + "}", "0").replace("{" + name + ":path}", "0")
                out.append((method, path + ("?action=save" if "slot" in path else ""), {"filename": "x.bin"}))
    assert covered <= {(m, r.path) for r in app.routes if is_admin_route(r) for m in r.methods}, \
        "an admin route lost its admin check"
    return out


def browser_attempt(c: TestClient, method: str, path: str, body, origin: str, key: str | None = None):
    """What fetch() from a page of `origin` does: the preflight, then (as a browser also sends 'simple' requests
    without any preflight) the request itself."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    pre = c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                   "Access-Control-Request-Headers": "authorization, content-type"})
    resp = c.request(method, path, json=body, headers={"Origin": origin, "Sec-Fetch-Site": "cross-site", **auth})
    return pre, resp


def assert_refused(manager, pre, resp, status: int) -> None:
    assert pre.headers.get("access-control-allow-origin") in (None, TRUSTED), pre.headers
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers.get("access-control-allow-origin") in (None, TRUSTED)
    assert manager.loaded_name == MODELS[0], "a refused request changed the model"
    assert MODELS[1] not in resp.text, "a refused request showed the library"


@pytest.mark.parametrize("keys", [{}, {"api_key": "user"}, {"api_key": "user", "admin_key": "adm"}])
def test_pages_of_other_origins_cannot_perform_admin_actions(demo_library, keys):
    manager, app, c = library_app(demo_library, **keys)
    presented = [None] + [k for k in (keys.get("api_key"), keys.get("admin_key")) if k]
    for method, path, body in admin_requests(app):
        for key in presented:           # no key, the API key only, even the admin key: the origin is not listed
            pre, resp = browser_attempt(c, method, path, body, EVIL, key)
            assert pre.status_code == 403, (method, path, pre.headers)
            assert_refused(manager, pre, resp, 401 if keys.get("api_key") and key is None else 403)
    # Generation from the same page is the ecosystem's convention and still works.
    pre, resp = browser_attempt(c, "POST", "/api/v1/generate", {"prompt": "x", "max_length": 2}, EVIL,
                                keys.get("api_key"))
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("keys", [{"api_key": "user", "admin_key": "adm"}, {"api_key": "user"},
                                  {"admin_key": "adm"}])
def test_a_listed_origin_with_the_admin_key_may(demo_library, keys):
    manager, app, c = library_app(demo_library, cors=TRUSTED, **keys)
    admin = keys.get("admin_key") or keys["api_key"]
    for method, path, body in admin_requests(app):
        # from the listed origin: without a key, or with the API key when an admin key is set, refused
        for key in [None] + ([keys["api_key"]] if "api_key" in keys and "admin_key" in keys else []):
            pre, resp = browser_attempt(c, method, path, body, TRUSTED, key)
            assert_refused(manager, pre, resp, 401)
        pre, resp = browser_attempt(c, method, path, body, EVIL, admin)         # an unlisted origin
        assert pre.status_code == 403
        assert_refused(manager, pre, resp, 403)
    pre, resp = browser_attempt(c, "POST", "/api/admin/reload_config", {"filename": MODELS[1]}, TRUSTED, admin)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == TRUSTED
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert resp.status_code == 200 and resp.json() == {"success": True}
    assert resp.headers["access-control-allow-origin"] == TRUSTED
    assert manager.loaded.wait(20) and manager.loaded_name == MODELS[1]
    pre, resp = browser_attempt(c, "POST", "/api/v1/model", {"action": "unload"}, TRUSTED, admin)
    assert resp.status_code == 200 and manager.loaded_name is None


def test_a_listed_origin_cannot_perform_admin_actions_when_no_key_is_set(demo_library):
    manager, app, c = library_app(demo_library, cors=TRUSTED)
    pre, resp = browser_attempt(c, "POST", "/v1/internal/model/unload", None, TRUSTED)
    assert_refused(manager, pre, resp, 403)
    assert "--admin-key" in resp.json()["error"]["message"]


def test_scripts_and_the_servers_own_pages_keep_admin_without_a_key(demo_library):
    manager, app, c = library_app(demo_library)
    # no Origin: a script, text-generation-webui API clients, SillyTavern's server
    assert c.post("/api/v1/model", json={"action": "load", "model_name": MODELS[1]}).status_code == 200
    assert manager.loaded_name == MODELS[1]
    # the server's own page (/docs "Try it out"): Origin equals the Host it was served from
    r = c.post("/v1/internal/model/unload", headers={"Origin": "http://127.0.0.1:5001",
                                                     "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and manager.loaded_name is None
    r = c.post("/api/admin/reload_config", json={"filename": MODELS[0]}, headers={"Origin": "http://localhost:5001"})
    assert r.status_code == 403, "localhost:5001 and 127.0.0.1:5001 are different origins"
    # a page that sends no Origin but says it is cross-site (a navigation or <img> from another site)
    r = c.get("/api/admin/list_options", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and MODELS[0] not in r.text


def test_koboldai_lite_opened_from_a_file_still_generates(demo_library):
    # A page opened from file:// sends `Origin: null`.
    manager, app, c = library_app(demo_library)
    pre, resp = browser_attempt(c, "POST", "/api/extra/generate/stream", {"prompt": "x", "max_length": 2}, "null")
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert resp.status_code == 200 and "event: message" in resp.text
    assert resp.headers["access-control-allow-origin"] == "*"
    for path in ("/api/v1/model", "/api/extra/version", "/api/v1/config/max_context_length"):
        r = c.get(path, headers={"Origin": "null"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    pre, resp = browser_attempt(c, "POST", "/api/admin/reload_config", {"filename": MODELS[1]}, "null")
    assert_refused(manager, pre, resp, 403)


@pytest.mark.parametrize("cors", [None, TRUSTED])
def test_no_route_echoes_an_unlisted_origin_with_credentials(demo_library, cors):
    manager, app, c = library_app(demo_library, cors=cors, api_key="user")
    for route in app.routes:
        for method in sorted((getattr(route, "methods", None) or set()) - {"HEAD"}):
            path = route.path.replace("{model_id:path}", "x")
            for origin in (EVIL, "null"):
                pre = c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method})
                resp = c.request(method, path, headers={"Origin": origin})
                for r in (pre, resp):
                    allowed = r.headers.get("access-control-allow-origin")
                    assert allowed in (None, "*"), (method, path, origin, allowed)
                    assert "access-control-allow-credentials" not in r.headers, (method, path)
                    if is_admin_route(route):
                        assert allowed is None, (method, path, "an admin route answered CORS to an unlisted origin")
            manager.load(MODELS[0]) if manager.loaded_name is None else None


# ---------------------------------------------------------------------------------------------- DNS rebinding

def test_loopback_listener_refuses_foreign_host_names(demo_library):
    manager, app, c = library_app(demo_library, allowed_hosts=("airo.lan",))
    for host in ("evil.example", "evil.example:5001", "127.0.0.1.nip.io:5001", "0.0.0.0:5001", "192.168.1.7"):
        r = c.get("/api/v1/model", headers={"Host": host})
        assert r.status_code == 403 and b"Host not allowed" in r.content, host
        r = c.post("/api/v1/generate", json={"prompt": "x", "max_length": 2}, headers={"Host": host})
        assert r.status_code == 403, host
        with pytest.raises(WebSocketDenialResponse) as e:
            with c.websocket_connect("ws://127.0.0.1:5001/api/v1/stream", headers={"Host": host}):
                pass
        assert e.value.status_code == 403
    for host in ("127.0.0.1:5001", "localhost:5001", "LOCALHOST.", "[::1]:5001", "app.localhost:5001", "127.0.0.2",
                 "airo.lan:5001"):
        assert c.get("/api/v1/model", headers={"Host": host}).status_code == 200, host
    # listening beyond loopback the Host is not checked (other machines use whatever name reaches this one)
    wide = create_app(manager, Settings(host="0.0.0.0", textgen_stream_port=0),
                      get_plugin_manager(load_entrypoints=False))
    assert TestClient(wide, base_url="http://127.0.0.1:5001").get(
        "/api/v1/model", headers={"Host": "my-box.lan"}).status_code == 200
    anyhost = create_app(manager, Settings(allowed_hosts=("*",), textgen_stream_port=0),
                         get_plugin_manager(load_entrypoints=False))
    assert TestClient(anyhost, base_url="http://127.0.0.1:5001").get(
        "/api/v1/model", headers={"Host": "evil.example"}).status_code == 200


def _raw_request(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_real_listeners_refuse_foreign_hosts_on_both_ports(demo_library, caplog):
    """serve_async on 127.0.0.1 with text-generation-webui's extra streaming port: HTTP and WebSocket upgrades
    with a foreign Host are refused on both; the same with a loopback Host are served."""
    port, ws_port = free_port(), free_port()
    settings = Settings(model_dir=str(demo_library), n_ctx=256, port=port, textgen_stream_port=ws_port, quiet=True)
    manager = ModelManager(settings, engine_factory=lambda entry, s, progress: (scripted_engine()[0], None))
    manager.load(MODELS[0])
    app = create_app(manager, settings, get_plugin_manager(load_entrypoints=False))
    ready, failed = threading.Event(), []

    def run():
        try:
            asyncio.run(serve_async(app, settings, ready=lambda listeners: ready.set()))
        except BaseException as e:  # reported by the assertion below
            failed.append(e)
            ready.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and not failed, failed
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = ("GET /api/v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        for p in (port, ws_port):
            assert _raw_request(p, upgrade.format(host=f"evil.example:{p}")).startswith(b"HTTP/1.1 403"), p
            assert _raw_request(p, upgrade.format(host=f"127.0.0.1:{p}")).startswith(b"HTTP/1.1 101"), p
            r = httpx.get(f"http://127.0.0.1:{p}/api/v1/model", headers={"Host": f"evil.example:{p}"})
            assert r.status_code == 403
            assert httpx.get(f"http://127.0.0.1:{p}/api/v1/model").status_code == 200
    finally:
        for s in getattr(app.state, "servers", []):
            s.should_exit = True
        thread.join(30)
