"""Disconnect and abort, measured in model evaluations.

tests/server/test_server_concurrency.py shows that a disconnect stops a lone generation and that abort by genkey
finds one running job. Here the harder cases, with a second request waiting behind the first, on a real uvicorn
server over the scripted model of tests/server/fakes.py (a fixed reply, an evaluation counter, and a forward pass
held until the test releases it, so that "while A generates" is a state the test waits for, not a duration):

- a client that disconnects mid-stream (each streaming protocol) frees the model within one token: counting
  evaluations, the abandoned generation runs at most one more after the close, and the waiting request then runs;
- abort routes stop the right request when two are in line: a genkey names the queued or the running one, and the
  genkey-less stop routes (KoboldCpp abort with no body, text-generation-webui stop-stream, OpenAI-side
  stop-generation) stop the running one only;
- aborts racing with completion (before, during, after; with and without a key) are harmless: every request ends
  well-formed, no abort leaks into the next generation, and the engine ends idle with an empty queue.
"""
from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from fakes import abort_calls, live, make_app, scripted_engine, wait_idle
from hardening_support import TextgenStream, parse_kobold_sse
from airobackend.types import FinishReason, GenerationRequest, SamplingParams
from sync import settle, watched

REPLY = "The quick brown fox jumps over the lazy dog. "
HOLD = 8        # the forward pass a running generation is held in: its first 7 tokens are out


def _setup(multiuser: int = 2):
    engine, model = scripted_engine(REPLY, eos=False, n_ctx=2048, multiuser=multiuser, hold_at=HOLD)
    return watched(engine), model, make_app(engine, n_ctx=2048, multiuser=multiuser)


def _queued(engine, n: int) -> None:
    settle(engine, lambda: len(engine._queue) == n)


def _blocking(url: str, out: dict, key: str, **body) -> threading.Thread:
    def go():
        r = httpx.post(url + "/api/v1/generate", json={"prompt": "y", **body}, timeout=60)
        out[key] = r
    t = threading.Thread(target=go)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------- disconnects

@pytest.mark.e2e       # a uvicorn server on a loopback port
@pytest.mark.parametrize("proto", ["kobold", "completions", "chat", "textgen"])
def test_disconnect_frees_the_model_within_one_token(proto):
    engine, model, app = _setup()
    aborted = abort_calls(engine)
    with live(app) as srv:
        out: dict = {}
        if proto == "textgen":
            ws = ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream").__enter__()
            ws.send(json.dumps({"prompt": "x", "max_new_tokens": 1000}))
            for _ in range(3):
                ws.recv(timeout=10)
            close = ws.close
        else:
            route, body = {
                "kobold": ("/api/extra/generate/stream", {"prompt": "x", "max_length": 1000}),
                "completions": ("/v1/completions", {"prompt": "x", "max_tokens": 1000, "stream": True}),
                "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 1000, "stream": True}),
            }[proto]
            client = httpx.Client(timeout=30)
            cm = client.stream("POST", srv.url + route, json=body)
            r = cm.__enter__()
            assert r.status_code == 200
            it = r.iter_raw()
            for _ in range(3):
                next(it)

            def close():
                cm.__exit__(None, None, None)
                client.close()
        assert model.inside.wait(60) and engine.is_running()
        # a second request waits behind the stream
        t = _blocking(srv.url, out, "b", max_length=3, genkey="KCPPB")
        _queued(engine, 1)
        evals_at_close = model.evals
        close()
        assert aborted.wait(60), "the server never noticed the client leave"
        model.release.set()                     # the held pass ends; the abandoned generation must stop there
        t.join(60)
        assert "b" in out, "the waiting request never ran: the abandoned stream still holds the model"
        rb = out["b"]
        assert rb.status_code == 200 and rb.json()["results"][0]["text"] == REPLY[:3]
        # the waiting request needs exactly 3 evaluations (its prompt tail, then 2 tokens; the 3rd is sampled
        # without evaluating it): everything else after the close belongs to the abandoned stream
        extra = model.evals - evals_at_close - 3
        assert extra <= 1, f"the abandoned generation ran {extra} more evaluations after the client left"
        assert wait_idle(engine) and engine.perf()["queue"] == 0


# ---------------------------------------------------------------------------------------------- abort routes

def _kobold_stream(url: str, out: dict, genkey: str) -> threading.Thread:
    def go():
        r = httpx.post(url + "/api/extra/generate/stream", json={"prompt": "x", "max_length": 1000,
                                                                  "genkey": genkey}, timeout=60)
        out["a"] = r
    t = threading.Thread(target=go)
    t.start()
    return t


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_abort_by_genkey_stops_the_queued_one_and_leaves_the_running_one():
    engine, model, app = _setup()
    with live(app) as srv:
        out: dict = {}
        ta = _kobold_stream(srv.url, out, "KCPPA")
        assert model.inside.wait(60) and engine.is_running("KCPPA")
        tb = _blocking(srv.url, out, "b", max_length=50, genkey="KCPPB")
        _queued(engine, 1)
        r = httpx.post(srv.url + "/api/extra/abort", json={"genkey": "KCPPB"})
        assert r.json() == {"success": "true", "done": "true"}
        tb.join(60)
        assert not tb.is_alive(), "the aborted queued request did not end"
        assert out["b"].json()["results"][0]["text"] == ""          # it never ran
        assert engine.is_running("KCPPA") and engine.queue_length == 0
        n = len(engine.partial_text("KCPPA"))
        model.release_and_hold_at(HOLD + 4)     # A goes on, and is held again four tokens later
        assert model.inside.wait(60) and len(engine.partial_text("KCPPA")) > n
        r = httpx.post(srv.url + "/api/extra/abort", json={"genkey": "KCPPA"})
        assert r.json()["success"] == "true"
        model.release.set()
        ta.join(60)
        text, reason = parse_kobold_sse(out["a"].content)
        assert reason == "length" and len(text) < 1000 and (REPLY * 30).startswith(text)


@pytest.mark.e2e       # a uvicorn server on a loopback port
@pytest.mark.parametrize("how", ["kobold-genkey", "kobold-empty", "textgen-stop-stream", "openai-stop-generation"])
def test_stopping_the_running_one_lets_the_queued_one_run_in_full(how):
    engine, model, app = _setup()
    with live(app) as srv:
        out: dict = {}
        ta = _kobold_stream(srv.url, out, "KCPPA")
        assert model.inside.wait(60) and len(engine.partial_text("KCPPA")) > 0      # A is running, with text
        tb = _blocking(srv.url, out, "b", max_length=12, genkey="KCPPB")
        _queued(engine, 1)
        path, body = {"kobold-genkey": ("/api/extra/abort", {"genkey": "KCPPA"}),
                      "kobold-empty": ("/api/extra/abort", None),
                      "textgen-stop-stream": ("/api/v1/stop-stream", {}),
                      "openai-stop-generation": ("/v1/internal/stop-generation", {})}[how]
        r = httpx.post(srv.url + path, json=body) if body is not None else httpx.post(srv.url + path)
        assert r.status_code == 200
        model.release.set()
        ta.join(60)
        assert not ta.is_alive()
        text, _ = parse_kobold_sse(out["a"].content)
        assert 0 < len(text) < HOLD
        tb.join(60)
        assert out["b"].json()["results"][0]["text"] == REPLY[:12]    # B untouched by the stop
        assert engine.perf()["last_token_count"] == 12


# ---------------------------------------------------------------------------------------------- races

def test_aborts_racing_with_completion_in_the_engine():
    """A thread fires aborts (keyed and not) at random moments while generations start and finish back to back."""
    engine, model = scripted_engine(REPLY, delay=0.0, eos=True, multiuser=2)
    stop = threading.Event()
    fired = [0]

    def aborter():
        rng = random.Random(5)
        while not stop.is_set():
            engine.abort(rng.choice([None, "KX", "KY", "nobody"]))
            fired[0] += 1
            time.sleep(rng.uniform(0, 0.002))

    t = threading.Thread(target=aborter)
    t.start()
    seen = {r: 0 for r in FinishReason}
    try:
        for i in range(300):
            req = GenerationRequest(prompt=f"p{i}", max_tokens=(i % 7) * 3, genkey="KX" if i % 2 else "",
                                    sampling=SamplingParams(temperature=0))
            events = list(engine.generate(req))
            last = events[-1]
            assert last.finish_reason is not None and all(e.finish_reason is None for e in events[:-1])
            text = "".join(e.text for e in events)
            assert REPLY.startswith(text)
            if last.finish_reason is not FinishReason.ABORTED:
                assert text == REPLY[:req.max_tokens], (i, last.finish_reason, text)
            seen[last.finish_reason] += 1
    finally:
        stop.set()
        t.join(5)
    assert fired[0] > 100 and seen[FinishReason.ABORTED] > 0 and seen[FinishReason.LENGTH] > 0
    assert engine.perf()["idle"] == 1 and engine.queue_length == 0
    # no abort outlives its generation: a stale one would cut this one short
    assert engine.abort("KX") is False and engine.abort() is False
    ev = list(engine.generate(GenerationRequest(prompt="z", max_tokens=20, genkey="KX")))
    assert "".join(e.text for e in ev) == REPLY[:20] and ev[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_aborts_racing_with_completion_over_http():
    engine, model = scripted_engine(REPLY, delay=0.002, eos=True, multiuser=2)
    rng = random.Random(11)
    with live(make_app(engine, multiuser=2)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        outcomes = set()
        for i in range(40):
            n = rng.randrange(1, 12) if i % 4 != 2 else 40
            key = f"KCPP{i:04d}"
            res = {}
            if i % 4 == 2:                          # held in its third forward pass: surely running
                model.release_and_hold_at(model.evals + 3)
            t = threading.Thread(target=lambda: res.update(r=c.post("/api/extra/generate/stream", json={
                "prompt": "p", "max_length": n, "genkey": key})))
            t.start()
            if i % 4 == 2:                          # the abort must hit
                assert model.inside.wait(60)
            elif i % 4 == 3:                        # surely over: the abort must miss, and harm nothing
                t.join(10)
            else:                                   # before the start, mid-generation, or after the end
                time.sleep(rng.uniform(0, 0.03))
            a = c.post("/api/extra/abort", json={"genkey": key} if i % 3 else None)
            assert a.status_code == 200 and a.json()["success"] in ("true", "false")
            if i % 4 == 2:
                assert a.json()["success"] == "true"
                model.release.set()
            elif i % 4 == 3:
                assert a.json()["success"] == "false"
            outcomes.add(a.json()["success"])
            t.join(10)
            text, reason = parse_kobold_sse(res["r"].content)
            assert reason == "length" and REPLY.startswith(text) and len(text) <= n
            # the next request is never hit by that abort
            r = c.post("/api/v1/generate", json={"prompt": "q", "max_length": 5, "genkey": f"N{i}"})
            assert r.json()["results"][0]["text"] == REPLY[:5]
        assert outcomes == {"true", "false"}       # both sides of the race happened
        # The last answer is sent when its final event is out; the worker thread closes the job just after.
        assert wait_idle(engine) and engine.queue_length == 0


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_websocket_stop_stream_mid_stream_keeps_the_socket():
    """text-generation-webui clients stop with /api/v1/stop-stream and send the next request on the same socket."""
    engine, model, app = _setup()
    with live(app) as srv:
        with ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream") as ws:
            ws.send(json.dumps({"prompt": "x", "max_new_tokens": 1000}))
            p = TextgenStream()
            for _ in range(3):
                p.feed(ws.recv(timeout=10))
            assert model.inside.wait(60)
            assert httpx.post(srv.url + "/api/v1/stop-stream", json={}).json() == {"results": "success"}
            model.release.set()
            while not p.feed(ws.recv(timeout=10)):
                pass
            assert p.error is None and 0 < len("".join(p.text)) < 1000
            ws.send(json.dumps({"prompt": "y", "max_new_tokens": 6}))
            q = TextgenStream()
            while not q.feed(ws.recv(timeout=10)):
                pass
            assert "".join(q.text) == REPLY[:6]
