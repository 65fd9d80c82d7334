"""Several clients at once, the busy answer, genkey-scoped check/abort, and disconnects aborting generations.

These run the real Engine over the scripted model of fakes.py (a fixed reply) behind a real uvicorn server on a
loopback port. A generation is kept open by holding the model inside one forward pass (`hold_at`) until the test
has done what it must do meanwhile; the tests wait on events (the pass entered, `engine.abort` called, the engine
idle), never on sleeps.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
import websockets

from fakes import abort_calls, live, make_app, scripted_engine, wait_idle

REPLY = "The quick brown fox jumps over the lazy dog. "
pytestmark = pytest.mark.e2e       # a uvicorn server on a loopback port
HOLD = 8        # the forward pass a held generation waits in: its first 7 tokens are out


def kobold_events(body: str) -> list[dict]:
    assert "\r" not in body
    chunks = body.split("\n\n")
    assert chunks[-1] == ""
    out = []
    for chunk in chunks[:-1]:
        event, data = chunk.split("\n")
        assert event == "event: message"
        assert data.startswith("data: ")
        out.append(json.loads(data[6:]))
    return out


def test_concurrent_streams_across_protocols_all_complete():
    engine, model = scripted_engine(REPLY, delay=0.002, multiuser=8)
    app = make_app(engine, multiuser=8)
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    with live(app) as srv:
        def kobold(i):
            with httpx.stream("POST", srv.url + "/api/extra/generate/stream",
                              json={"prompt": f"client {i}", "max_length": 200}, timeout=30) as r:
                assert r.status_code == 200
                events = kobold_events(r.read().decode())
            assert events[-1]["finish_reason"] == "stop"            # the scripted reply ends with EOS
            results[f"kobold{i}"] = "".join(e["token"] for e in events)

        def openai(i):
            with httpx.stream("POST", srv.url + "/v1/completions",
                              json={"prompt": f"client {i}", "max_tokens": 200, "stream": True}, timeout=30) as r:
                assert r.status_code == 200
                body = r.read().decode()
            assert body.endswith("data: [DONE]\n\n")
            parts = [json.loads(c[6:]) for c in body.split("\n\n")[:-2]]
            results[f"openai{i}"] = "".join(p["choices"][0]["text"] for p in parts)

        async def textgen(i):
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
                await ws.send(json.dumps({"prompt": f"client {i}", "max_new_tokens": 200}))
                text = ""
                while True:
                    msg = json.loads(await ws.recv())
                    if msg["event"] == "stream_end":
                        break
                    text += msg["text"]
            results[f"textgen{i}"] = text

        def run(fn, *a):
            try:
                fn(*a)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(kobold, i)) for i in range(2)]
        threads += [threading.Thread(target=run, args=(openai, i)) for i in range(2)]
        threads += [threading.Thread(target=run, args=(lambda i: asyncio.run(textgen(i)), i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len(results) == 6
    for name, text in results.items():
        assert text == REPLY, name


def test_full_queue_answers_busy_in_each_protocol_shape():
    engine, model = scripted_engine(REPLY, eos=False, multiuser=0, hold_at=HOLD)
    app = make_app(engine, multiuser=0)
    with live(app) as srv:
        holder = threading.Thread(target=lambda: httpx.post(
            srv.url + "/api/v1/generate", json={"prompt": "x", "max_length": 100, "genkey": "KCPP0001"},
            timeout=60))
        holder.start()
        assert model.inside.wait(60)
        r = httpx.post(srv.url + "/api/v1/generate", json={"prompt": "y", "max_length": 5})
        assert r.status_code == 503
        assert r.json() == {"detail": {"msg": "Server is busy; please try again later.",
                                       "type": "service_unavailable"}}
        r = httpx.post(srv.url + "/api/extra/generate/stream", json={"prompt": "y"})
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "y", "stream": True})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "unavailable_error"
        # the queue does not block the other routes
        assert httpx.get(srv.url + "/api/extra/perf").json()["idle"] == 0
        assert httpx.post(srv.url + "/api/extra/abort", json={"genkey": "KCPP0001"}).json()["success"] == "true"
        model.release.set()
        holder.join(60)
        assert engine.perf()["last_token_count"] < HOLD + 1        # aborted, not run to its 100 tokens
        r = httpx.post(srv.url + "/api/v1/generate", json={"prompt": "y", "max_length": 5})
        assert r.status_code == 200 and r.json()["results"][0]["text"] == REPLY[:5]


def test_genkey_check_and_abort_address_only_their_own_generation():
    engine, model = scripted_engine(REPLY, eos=False, hold_at=HOLD)
    app = make_app(engine)
    with live(app) as srv:
        out = {}

        def stream():
            with httpx.stream("POST", srv.url + "/api/extra/generate/stream",
                              json={"prompt": "story", "max_length": 400, "genkey": "KCPP1111"}, timeout=30) as r:
                out["events"] = kobold_events(r.read().decode())

        t = threading.Thread(target=stream)
        t.start()
        assert model.inside.wait(60)
        partial = httpx.post(srv.url + "/api/extra/generate/check", json={"genkey": "KCPP1111"}).json()
        text = partial["results"][0]["text"]
        assert len(text) >= 5 and (REPLY * 10).startswith(text)
        # another user's genkey, and the anonymous GET, see nothing of it
        assert httpx.post(srv.url + "/api/extra/generate/check",
                          json={"genkey": "KCPP2222"}).json() == {"results": [{"text": ""}]}
        assert httpx.get(srv.url + "/api/extra/generate/check").json() == {"results": [{"text": ""}]}
        assert httpx.post(srv.url + "/api/extra/abort", json={"genkey": "KCPP2222"}).json() == \
            {"success": "false", "done": "false"}
        assert engine.is_running("KCPP1111")
        assert httpx.post(srv.url + "/api/extra/abort", json={"genkey": "KCPP1111"}).json()["success"] == "true"
        model.release.set()
        t.join(60)
        assert not t.is_alive()
    events = out["events"]
    assert events[-1]["finish_reason"] == "length"
    generated = "".join(e["token"] for e in events)
    assert text == generated[:len(text)] and len(generated) <= HOLD and (REPLY * 10).startswith(generated)


def test_abort_with_empty_body_stops_the_running_generation():
    """SillyTavern posts /api/extra/abort with no body and no genkey."""
    engine, model = scripted_engine(REPLY, eos=False, hold_at=HOLD)
    app = make_app(engine)
    with live(app) as srv:
        res = {}
        t = threading.Thread(target=lambda: res.update(r=httpx.post(
            srv.url + "/api/v1/generate", json={"prompt": "x", "max_length": 400}, timeout=60)))
        t.start()
        assert model.inside.wait(60)
        r = httpx.post(srv.url + "/api/extra/abort", content=b"")
        assert r.status_code == 200 and r.json() == {"success": "true", "done": "true"}
        model.release.set()
        t.join(60)
        text = res["r"].json()["results"][0]["text"]
        assert 0 < len(text) <= HOLD and (REPLY * 10).startswith(text)


def _stopped_after_the_disconnect(model, engine, aborted: threading.Event) -> None:
    """The server noticed the client leave (it called engine.abort) while the model was held; released, the
    generation ends with that pass: no token evaluated beyond it."""
    assert aborted.wait(60), "the server never aborted the generation"
    model.release.set()
    assert wait_idle(engine)
    assert model.evals <= HOLD + 1 and engine.perf()["last_token_count"] < HOLD + 1


@pytest.mark.parametrize("route,body", [
    ("/api/extra/generate/stream", {"prompt": "x", "max_length": 1000}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000, "stream": True}),
])
def test_client_closing_a_stream_aborts_its_generation(route, body):
    engine, model = scripted_engine(REPLY, eos=False, n_ctx=2048, hold_at=HOLD)
    aborted = abort_calls(engine)
    app = make_app(engine, n_ctx=2048)
    with live(app) as srv:
        with httpx.stream("POST", srv.url + route, json=body, timeout=60) as r:
            assert r.status_code == 200
            it = r.iter_raw()
            next(it)
            next(it)
            assert model.inside.wait(60)
        # the client is gone: the generation stops with the pass under way and frees the model
        _stopped_after_the_disconnect(model, engine, aborted)
        r = httpx.post(srv.url + "/api/v1/generate", json={"prompt": "y", "max_length": 4}, timeout=10)
        assert r.json()["results"][0]["text"] == REPLY[:4]


def test_client_leaving_a_blocking_request_aborts_it():
    engine, model = scripted_engine(REPLY, eos=False, n_ctx=2048, hold_at=HOLD)
    aborted = abort_calls(engine)
    app = make_app(engine, n_ctx=2048)
    body = json.dumps({"prompt": "x", "max_length": 1000}).encode()
    with live(app) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert model.inside.wait(60)            # mid-generation, no answer sent yet: the client leaves
        _stopped_after_the_disconnect(model, engine, aborted)


def test_websocket_client_closing_aborts_its_generation():
    engine, model = scripted_engine(REPLY, eos=False, n_ctx=2048, hold_at=HOLD)
    aborted = abort_calls(engine)
    app = make_app(engine, n_ctx=2048)
    with live(app) as srv:
        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
                await ws.send(json.dumps({"prompt": "x", "max_new_tokens": 1000}))
                for _ in range(3):
                    await ws.recv()
                assert await asyncio.to_thread(model.inside.wait, 60)
        asyncio.run(go())
        _stopped_after_the_disconnect(model, engine, aborted)
