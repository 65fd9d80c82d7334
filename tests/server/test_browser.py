"""What a real browser does with the server: a page served from another local port can generate but cannot unload
or switch the model (CORS preflight refused, and the server itself refuses the admin request that a browser sends
without a preflight). Runs a headless Chromium (tests/server/chrome.py); skips where none is installed."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chrome import Chrome, needs_chromium
from fakes import LIBRARY_MODELS as MODELS
from fakes import library_app, live

pytestmark = pytest.mark.e2e       # a uvicorn server on a loopback port

# The page of the other origin: every attempt reports what the page could see of it.
ATTACK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>another site</title></head><body><script>
async function attempt(url, init) {
  try {
    const r = await fetch(url, init);
    let body = null;
    try { body = await r.text(); } catch (e) {}
    return {status: r.status, type: r.type, body: body};
  } catch (e) {
    return {error: String(e)};
  }
}
async function attack(base, key) {
  const json = {"Content-Type": "application/json"};
  if (key) json["Authorization"] = "Bearer " + key;
  return {
    unload: await attempt(base + "/api/v1/model",
                          {method: "POST", headers: json, body: JSON.stringify({action: "unload"})}),
    // a "simple" request (text/plain, no custom header): browsers send it without any preflight
    unload_simple: await attempt(base + "/v1/internal/model/unload", {method: "POST", mode: "no-cors", body: "{}"}),
    switch_model: await attempt(base + "/api/admin/reload_config",
                                {method: "POST", headers: json, body: JSON.stringify({filename: "second.gguf"})}),
    generate: await attempt(base + "/api/v1/generate",
                            {method: "POST", headers: json, body: JSON.stringify({prompt: "Hi", max_length: 4})}),
  };
}
</script></body></html>"""


class PageServer:
    """Serves ATTACK_PAGE on 127.0.0.1:<free port>: an origin other than the API's."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = ATTACK_PAGE.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "PageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@needs_chromium
def test_a_page_of_another_origin_can_generate_but_not_unload(demo_library, caplog):
    manager, app, _ = library_app(demo_library)
    with PageServer() as page, live(app) as api, Chrome() as chrome, \
            caplog.at_level(logging.WARNING, logger="airobackend.server"):
        tab = chrome.open(page.url)
        seen = tab.evaluate(f"attack({json.dumps(api.url)}, null)")
    # the preflighted attempts never left the browser: the preflight was refused
    assert "error" in seen["unload"] and "error" in seen["switch_model"], seen
    # the simple request did reach the server, which refused it itself
    assert seen["unload_simple"]["type"] == "opaque", seen
    assert any("refused an admin action on /v1/internal/model/unload" in r.getMessage() for r in caplog.records)
    assert manager.loaded_name == MODELS[0], "a page of another origin changed the model"
    # generation from the same page works, and its answer is readable by the page
    assert seen["generate"]["status"] == 200, seen
    assert json.loads(seen["generate"]["body"])["results"][0]["text"], seen


@needs_chromium
def test_a_listed_origin_with_the_admin_key_can_unload(demo_library):
    with PageServer() as page:
        origin = page.url.rstrip("/")
        manager, app, _ = library_app(demo_library, cors=origin, admin_key="adm")
        with live(app) as api, Chrome() as chrome:
            tab = chrome.open(page.url)
            without = tab.evaluate(f"attack({json.dumps(api.url)}, null)")
            assert without["unload"]["status"] == 401 and manager.loaded_name == MODELS[0], without
            seen = tab.evaluate(f"attack({json.dumps(api.url)}, 'adm')")
    assert seen["unload"]["status"] == 200, seen
    assert seen["generate"]["status"] == 200, seen
    assert seen["switch_model"]["status"] == 200 and json.loads(seen["switch_model"]["body"]) == {"success": True}
    assert manager.loaded.wait(20) and manager.loaded_name == MODELS[1]


# Resolves with the text of the first element matching `selector` once the page has rendered it.
WAIT_FOR = """new Promise((resolve, reject) => {
  const find = () => document.querySelector(%s);
  const done = () => { const e = find(); if (e && e.textContent.trim()) { observer.disconnect(); resolve(e.textContent); return true; } };
  const observer = new MutationObserver(done);
  if (!done()) { observer.observe(document, {childList: true, subtree: true, characterData: true});
                 setTimeout(() => reject(new Error("nothing matched " + %s)), 60000); }
})"""


def wait_for(tab, selector: str) -> str:
    return tab.evaluate(WAIT_FOR % (json.dumps(selector), json.dumps(selector)))


@needs_chromium
def test_docs_render_offline_and_the_front_page_says_what_is_served(demo_engine):
    from fakes import make_app

    app = make_app(demo_engine, textgen_stream_port=5005)
    info = demo_engine.model_info()
    with live(app) as api, Chrome() as chrome:      # the browser resolves no name but this machine's
        docs = chrome.open(api.url + "/docs")
        assert "airobackend" in wait_for(docs, ".swagger-ui .info .title")
        paths = docs.evaluate("Array.from(document.querySelectorAll('.opblock-summary-path'))"
                              ".map(e => e.textContent.trim())")
        assert {"/api/v1/generate", "/v1/chat/completions", "/api/extra/generate/stream"} <= set(paths)
        failed = docs.evaluate("performance.getEntriesByType('resource').filter(e => !e.name.startsWith("
                               f"{json.dumps(api.url)})).map(e => e.name)")
        assert failed == [], f"/docs loaded files from elsewhere: {failed}"

        front = chrome.open(api.url + "/")
        assert wait_for(front, "#model") == info["name"]
        assert wait_for(front, "#mix") == info["mix"]
        assert "RANDOM weights" in wait_for(front, "#demo-warning")
        rows = front.evaluate("Array.from(document.querySelectorAll('#frontends tr')).slice(1)"
                              ".map(r => r.textContent)")
        assert any(r.startswith("KoboldAI Lite") and api.url in r for r in rows), rows
        assert any(r.startswith("OpenAI SDKs") and f'base_url="{api.url}/v1"' in r for r in rows), rows
        assert any("ws://127.0.0.1:5005/api/v1/stream" in r for r in rows), rows
        links = front.evaluate("Array.from(document.links).map(a => a.href)")
        assert api.url + "/docs" in links
