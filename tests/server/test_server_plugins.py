"""The plugin surface: every hook documented and exercised, third-party plugins from the entry-point group, built-in
adapters blockable by name, and the built-ins registered the same way as third-party plugins."""
from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import textwrap
import threading

import httpx
import pytest
from fastapi import APIRouter
from starlette.testclient import TestClient

from airobackend import hookspecs
from airobackend.commands import serve
from airobackend.hookspecs import hookimpl
from airobackend.plugins import DEFAULT_PLUGINS, describe_plugins, get_plugin_manager
from airobackend.server import create_app, serve_async
from airobackend.settings import Settings

from fakes import free_port
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "airobackend_spec")]


def test_hooks_are_few_and_documented():
    assert sorted(HOOKS) == sorted(["add_cli_arguments", "register_routes", "build_generation_request",
                                    "format_chat_prompt", "error_response", "startup", "shutdown"])
    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__
        assert doc and doc.strip(), name


def test_builtins_are_registered_by_dotted_name_and_blockable(demo_engine):
    pm = get_plugin_manager(load_entrypoints=False)
    assert {n for n, p in pm.list_name_plugin()} == {"kobold", "textgen", "openai", "models", "llamacpp"}
    assert [p.__name__ for p in pm.get_plugins() if p.__name__ in DEFAULT_PLUGINS]
    assert all("built-in" in line for line in describe_plugins(pm))
    pm = get_plugin_manager(load_entrypoints=False, blocked=["openai", "airobackend.adapters.textgen", "models",
                                                             "llamacpp"])
    assert [n for n, p in pm.list_name_plugin() if p is not None] == ["kobold"]
    c = TestClient(create_app(demo_engine, Settings(), pm))
    assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 404
    assert c.post("/api/v1/token-count", json={"prompt": "x"}).status_code == 404
    assert c.get("/api/admin/list_options").status_code == 404
    assert c.post("/api/v1/generate", json={"prompt": "x", "max_length": 3}).status_code == 200


class RoutesPlugin:
    @hookimpl
    def register_routes(self, engine, settings):
        router = APIRouter()

        @router.get("/myproto/name")
        async def name() -> dict:
            return {"model": engine.model_info()["name"], "ctx": settings.n_ctx}

        return router


class CapTokens:
    """A wrapper adjusting whatever the adapters built (a pluggy `wrapper=True` hook implementation)."""

    @hookimpl(wrapper=True)
    def build_generation_request(self, protocol):
        req = yield
        if req is not None:
            req.max_tokens = min(req.max_tokens, 4)
        return req


class Replace:
    @hookimpl(tryfirst=True)
    def build_generation_request(self, protocol, payload):
        if protocol == "kobold" and payload.get("magic"):
            from airobackend.types import GenerationRequest
            return GenerationRequest(prompt="x", max_tokens=2)
        return None


class Template:
    def __init__(self):
        self.seen = []

    @hookimpl
    def format_chat_prompt(self, messages, model_info):
        self.seen.append((messages, model_info["name"]))
        return "CUSTOM PROMPT"


def test_plugin_hooks_change_routes_requests_and_templates(demo_engine):
    engine = demo_engine
    name = engine.model_info()["name"]
    pm = get_plugin_manager(load_entrypoints=False)
    template = Template()
    for plugin in (RoutesPlugin(), CapTokens(), Replace(), template):
        pm.register(plugin)
    c = TestClient(create_app(engine, Settings(n_ctx=333, api_key="k"), pm))
    auth = {"Authorization": "Bearer k"}
    assert c.get("/myproto/name").status_code == 401            # plugin routes are behind the key too
    assert c.get("/myproto/name", headers=auth).json() == {"model": name, "ctx": 333}
    r = c.post("/api/v1/generate", json={"prompt": "x", "max_length": 100, "use_default_badwordsids": True},
               headers=auth)
    assert r.status_code == 200 and engine.perf()["last_token_count"] == 4          # the wrapper capped it
    r = c.post("/api/v1/generate", json={"prompt": "x", "magic": True}, headers=auth)
    assert r.status_code == 200 and engine.perf()["last_token_count"] <= 2          # replaced outright
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth)
    assert r.json()["usage"]["prompt_tokens"] == len(engine.tokenize("CUSTOM PROMPT"))
    assert template.seen == [([{"role": "user", "content": "hi"}], name)]


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_startup_and_shutdown_hooks_and_extra_listeners(demo_engine):
    calls = []
    extra = free_port()

    class Lifecycle:
        @hookimpl
        def startup(self, engine, settings, app):
            calls.append(("startup", settings.port))
            app.state.extra_listeners.append(("127.0.0.1", extra))

        @hookimpl
        def shutdown(self, app):
            calls.append(("shutdown", len(app.state.servers)))

    pm = get_plugin_manager(load_entrypoints=False, blocked=["textgen"])
    pm.register(Lifecycle())
    settings = Settings(port=free_port(), textgen_stream_port=0)
    app = create_app(demo_engine, settings, pm)
    ready = threading.Event()
    t = threading.Thread(target=lambda: asyncio.run(serve_async(app, settings, ready=lambda _: ready.set())),
                         daemon=True)
    t.start()
    assert ready.wait(20)
    assert httpx.get(f"http://127.0.0.1:{extra}/api/extra/version").json()["result"] == "KoboldCpp"
    for s in app.state.servers:
        s.should_exit = True
    t.join(10)
    assert calls == [("startup", settings.port), ("shutdown", 2)]


PLUGIN_SOURCE = textwrap.dedent('''
    from fastapi import APIRouter
    from airobackend.hookspecs import hookimpl

    @hookimpl
    def add_cli_arguments(parser):
        parser.add_argument("--myproto-greeting", default="hi")

    @hookimpl
    def register_routes(engine):
        router = APIRouter()
        router.add_api_route("/myproto/ping", lambda: {"pong": True}, methods=["GET"])
        return router
''')


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A third-party distribution declaring `[project.entry-points.airobackend] myproto = "airo_testplug"`."""
    import importlib

    (tmp_path / "airo_testplug.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "airo_testplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: airo-testplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[airobackend]\nmyproto = airo_testplug\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delenv("AIRO_NO_ENTRYPOINTS", raising=False)
    yield
    sys.modules.pop("airo_testplug", None)


def test_third_party_plugin_from_the_entry_point_group(installed_plugin, demo_engine):
    pm = get_plugin_manager()
    assert pm.has_plugin("myproto")
    assert any("airo-testplug 0.1" in line for line in describe_plugins(pm))
    engine = demo_engine
    c = TestClient(create_app(engine, Settings(), pm))
    assert c.get("/myproto/ping").json() == {"pong": True}
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)                 # plugin flags appear on `airobackend serve`
    assert parser.parse_args(["--myproto-greeting", "yo"]).myproto_greeting == "yo"
    pm = get_plugin_manager(blocked=["myproto"])
    assert not pm.has_plugin("myproto")
    c = TestClient(create_app(engine, Settings(), pm))
    assert c.get("/myproto/ping").status_code == 404


def test_disable_adapter_from_settings_reaches_create_app(demo_engine):
    app = create_app(demo_engine, Settings(disable_adapters=("kobold", "textgen")))
    c = TestClient(app)
    assert c.get("/api/extra/version").status_code == 404
    assert c.get("/v1/models").status_code == 200


def test_openapi_page_documents_every_protocol(demo_engine):
    c = TestClient(create_app(demo_engine, Settings()))
    page = c.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    spec = c.get("/openapi.json").json()
    for path in ("/api/v1/generate", "/api/extra/generate/stream", "/api/extra/abort", "/api/v1/chat",
                 "/api/v1/token-count", "/v1/completions", "/v1/chat/completions", "/v1/internal/encode"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"]["messages"][0]["role"] == "user"
