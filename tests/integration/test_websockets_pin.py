"""The server's WebSocket routes on websockets 11.x, the newest that text-generation-webui 2.8.1 allows.

Its gradio-client 1.0.2 requires websockets < 12, and installing this project into the web UI's environment (the
extension's in-process mode) must not upgrade it; pyproject.toml accepts 11.x for that. The server does not use the
package itself: uvicorn's WebSocket protocol does (`ws="websockets-sansio"`, airobackend/server.py). So this runs
`airobackend serve` with websockets 11.0.3 first on its path and replays text-generation-webui's streaming API
examples (as tests/server/test_server_textgen.py does) on the main port and on the legacy streaming port.
Slow: it fetches websockets 11.0.3 from the package index with pip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from integration_support import Server, engine_text, serve_available

pytestmark = pytest.mark.slow

WS_VERSION = "11.0.3"
REQUEST = {"prompt": "Once upon a time, in a quiet village by the sea,", "max_new_tokens": 16, "top_k": 1,
           "repetition_penalty": 1.0, "ban_eos_token": True, "seed": 1}


@pytest.fixture(scope="module")
def websockets_11(tmp_path_factory):
    target = tmp_path_factory.mktemp("websockets11")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"websockets=={WS_VERSION}"], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"pip could not install websockets=={WS_VERSION}: {pip.stderr.strip()[-300:]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    seen = subprocess.run([sys.executable, "-c", "import websockets, uvicorn; print(websockets.__version__)"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert seen == WS_VERSION
    return {"PYTHONPATH": env["PYTHONPATH"]}


def stream(uri: str) -> list[str]:
    """text-generation-webui's api-example-stream.py protocol, with the threading client (any websockets version)."""
    from websockets.sync.client import connect
    pieces = []
    with connect(uri) as ws:
        ws.send(json.dumps(REQUEST))
        while True:
            event = json.loads(ws.recv(timeout=120))
            if event["event"] == "text_stream":
                pieces.append(event["text"])
            elif event["event"] == "stream_end":
                return pieces


def test_websocket_routes_serve_with_websockets_11(fx_model, websockets_11, tmp_path):
    serve_available()
    server = Server(fx_model, tmp_path / "serve.log", env=websockets_11)
    try:
        expected = engine_text(fx_model, REQUEST["prompt"], 16, top_k=1, repetition_penalty=1.0, ban_eos=True, seed=1)
        for port in (server.port, server.stream_port):
            pieces = stream(f"ws://127.0.0.1:{port}/api/v1/stream")
            assert "".join(pieces) == expected and len(pieces) > 1
        blocking = httpx.post(server.url + "/api/v1/generate", json=REQUEST, timeout=120).json()
        assert blocking["results"][0]["text"] == expected
    finally:
        server.stop()
