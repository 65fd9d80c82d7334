"""Faults with --parallel 4 through the real HTTP routes (issue "Many users at once", "Bad input and faults").

One server over the demo model with 4 slots and 4 waiting places (uvicorn on a loopback port, the real engine and
scheduler). The model's batched forward pass is wrapped so that a test can hold a pass until the situation it
builds is complete, and can see which slots every pass carried:

- 64 clients of the four streaming routes at once: exactly 4 run and 4 wait, the other 56 get their protocol's
  busy answer at once; the 8 then stream to their end; none hangs, and the slots end idle;
- a client that disconnects mid-stream: its slot is evaluated in no pass after the one running when the server
  saw it go, while another slot's stream goes on and equals its text alone;
- an abort by genkey while a prompt is evaluated in chunks beside a streaming slot: no later pass carries that
  slot, the stream ends at once, and the same prompt sent again reuses the chunks evaluated before the abort;
- a prompt longer than a slot's context: a clear answer in each protocol's shape while other slots stream, and
  the server serves on.
The engine-level cases (abort mid-prefill and a closed stream with the fake model, the RAM check counting every
slot's KV cache) are in tests/test_parallel.py and tests/test_manager.py.
"""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from fakes import demo_manager, live, make_app
from hardening_support import (BUSY_MESSAGE, TextgenStream, check_kobold_busy, check_openai_busy, parse_kobold_sse,
                               parse_openai_sse)

pytestmark = pytest.mark.e2e       # a uvicorn server on a loopback port (the module's `server`)
WAIT = 60.0
N_CTX = 128
SLOTS, WAITING = 4, 4
PREFILL_CHUNK = 16
GREEDY = {"temperature": 0, "top_k": 0, "top_p": 1.0, "rep_pen": 1.0, "repetition_penalty": 1.0}


class Passes:
    """Wraps the engine model's eval_batch: records the slot ids of every pass; `gate(k, chunks)`, when set, runs
    before pass k, whose `chunks` maps each slot id in it to its number of tokens (it may block until the test's
    situation is ready)."""

    def __init__(self, engine) -> None:
        self.engine, self.model = engine, engine.model
        self.slots: list[set[int]] = []
        self.gate = None
        self.lock = threading.Lock()
        self._orig = self.model.eval_batch
        self.model.eval_batch = self._eval_batch

    def _eval_batch(self, seqs, want=None):
        k = len(self.slots)
        by_cache = {id(s.cache): s.id for s in self.engine.slots}
        if self.gate is not None:
            chunks: dict = {}
            for c, _, toks in seqs:
                chunks[by_cache[id(c)]] = chunks.get(by_cache[id(c)], 0) + len(toks)
            self.gate(k, chunks)
        with self.lock:
            self.slots.append({by_cache[id(c)] for c, _, _ in seqs})
        return self._orig(seqs, want)

    def close(self) -> None:
        del self.model.eval_batch


@pytest.fixture(scope="module")
def server(demo_model):
    manager = demo_manager(str(demo_model), N_CTX, multiuser=WAITING, parallel=SLOTS, prompt_cache_mb=0,
                           prefill_chunk=PREFILL_CHUNK)
    # The default connection cap (--max-connections 128) leaves room for 64 clients and the test's own: every client
    # reaches the engine, whose slots and line decide who runs, waits or is answered busy.
    app = make_app(manager, n_ctx=N_CTX, multiuser=WAITING, parallel=SLOTS)
    with live(app) as srv:
        yield srv, manager
    manager.unload()


@pytest.fixture()
def passes(server):
    p = Passes(server[1]._engine)
    yield p
    p.close()
    engine = server[1]._engine
    with engine._cond:          # every test leaves the slots idle and the line empty
        assert engine._cond.wait_for(lambda: not any(s.busy for s in engine.slots) and not engine._queue, WAIT)


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=WAIT).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def kobold_text(raw: bytes) -> str:
    return parse_kobold_sse(raw)[0]


def alone(url: str, prompt: str, n: int) -> str:
    r = httpx.post(url + "/api/v1/generate", json={"prompt": prompt, "max_length": n, **GREEDY,
                                                     "use_default_badwordsids": True}, timeout=WAIT)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["text"]


def test_sixty_four_clients_on_four_slots(server, passes):
    srv, manager = server
    engine = manager._engine
    protos = ("kobold", "completions", "chat", "textgen")
    busy_answers = threading.Semaphore(0)
    outcome: list = [None] * 64
    go = threading.Barrier(64)

    def admitted_all() -> bool:
        return sum(s.busy for s in engine.slots) + len(engine._queue) == SLOTS + WAITING

    def gate(k: int, chunks: dict) -> None:
        if k == 0:      # the first pass waits until 8 are in and the other 56 have had their busy answer
            with engine._cond:
                assert engine._cond.wait_for(admitted_all, WAIT)
            for _ in range(64 - SLOTS - WAITING):
                assert busy_answers.acquire(timeout=WAIT), "a refused client never got its busy answer"
    passes.gate = gate

    def client(i: int) -> None:
        proto = protos[i % 4]
        prompt = f"Client {i} says"
        try:
            go.wait(WAIT)
            if proto == "textgen":
                with ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream", open_timeout=WAIT) as ws:
                    ws.send(json.dumps({"prompt": prompt, "max_new_tokens": 6}))
                    p = TextgenStream()
                    while not p.feed(ws.recv(timeout=WAIT)):
                        pass
                if p.error is not None:
                    assert p.error == BUSY_MESSAGE, p.error
                    busy_answers.release()
                    outcome[i] = "busy"
                else:
                    outcome[i] = "done"
                return
            path, body = {
                "kobold": ("/api/extra/generate/stream", {"prompt": prompt, "max_length": 6}),
                "completions": ("/v1/completions", {"prompt": prompt, "max_tokens": 6, "stream": True}),
                "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                                  "max_tokens": 6, "stream": True}),
            }[proto]
            with httpx.Client(timeout=WAIT) as http, http.stream("POST", srv.url + path, json=body) as r:
                raw = r.read()
            if r.status_code == 503:
                (check_kobold_busy if proto == "kobold" else check_openai_busy)(r)
                busy_answers.release()
                outcome[i] = "busy"
                return
            assert r.status_code == 200, raw[:300]
            if proto == "kobold":
                parse_kobold_sse(raw)
            else:
                parse_openai_sse(raw, chat=proto == "chat")
            outcome[i] = "done"
        except BaseException as e:      # reported by the test thread
            outcome[i] = e

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not any(t.is_alive() for t in threads), "a client hung"
    errors = [o for o in outcome if isinstance(o, BaseException)]
    assert not errors, errors[:3]
    assert outcome.count("done") == SLOTS + WAITING and outcome.count("busy") == 64 - SLOTS - WAITING
    assert max(len(s) for s in passes.slots) == SLOTS          # the four slots ran together
    with engine._cond:
        assert engine._cond.wait_for(lambda: not any(s.busy for s in engine.slots), WAIT)
    slots = httpx.get(srv.url + "/slots", timeout=WAIT).json()
    assert len(slots) == SLOTS and not any(s["is_processing"] for s in slots)
    m = metrics(srv.url)
    assert m["llamacpp:requests_processing"] == 0 and m["llamacpp:requests_deferred"] == 0
    assert httpx.get(srv.url + "/api/extra/perf", timeout=WAIT).json()["queue"] == 0


OTHER_TOKENS = 100      # the other stream outlasts the leaver's start by far (a slot holds N_CTX = 128 tokens)


@pytest.mark.parametrize("proto", ["kobold", "completions", "textgen"])
def test_a_client_leaving_mid_stream_frees_its_slot_within_a_pass(server, passes, proto):
    srv, manager = server
    engine = manager._engine
    other_prompt = "The forest was quiet"
    expected = alone(srv.url, other_prompt, OTHER_TOKENS)
    passes.slots.clear()
    first_chunk, left, other_streams = threading.Event(), threading.Event(), threading.Event()
    at_leave: list[int] = []

    def leaver_job():
        return next((s.job for s in engine.slots if s.busy and s.job.genkey == "LEAVER"), None)

    def gate(k: int, chunks: dict) -> None:
        job = leaver_job()
        if job is not None and len(job.text) >= 2 and not first_chunk.is_set():
            # the leaver's first chunks are out: no pass until its client has one, so the other stream cannot run
            # to its end while the client is about to leave (then no pass would follow the departure)
            assert first_chunk.wait(WAIT)
        if first_chunk.is_set() and not at_leave:
            # hold this pass until the server has seen the client go and aborted its generation
            assert left.wait(WAIT)
            job = leaver_job()
            assert job is None or job.abort.wait(WAIT), "the server never aborted the departed client's job"
            at_leave.append(k)
    passes.gate = gate

    got: dict = {}

    def other() -> None:
        with httpx.Client(timeout=WAIT) as http, http.stream(
                "POST", srv.url + "/api/extra/generate/stream",
                json={"prompt": other_prompt, "max_length": OTHER_TOKENS, "use_default_badwordsids": True,
                      **GREEDY}) as r:
            chunks = r.iter_raw()
            raw = next(chunks)
            other_streams.set()
            got["other"] = kobold_text(raw + b"".join(chunks))
    t = threading.Thread(target=other)
    t.start()
    assert other_streams.wait(WAIT)
    body = {"prompt": "Once upon a time", "genkey": "LEAVER", **GREEDY}
    if proto == "textgen":
        with ws_connect(f"ws://127.0.0.1:{srv.port}/api/v1/stream", open_timeout=WAIT) as ws:
            ws.send(json.dumps(dict(body, max_new_tokens=100, ban_eos_token=True)))
            p = TextgenStream()
            while p.n < 2:
                assert not p.feed(ws.recv(timeout=WAIT))
            first_chunk.set()
    else:
        path, extra = {"kobold": ("/api/extra/generate/stream", {"max_length": 100, "use_default_badwordsids": True}),
                       "completions": ("/v1/completions", {"max_tokens": 100, "ignore_eos": True,
                                                           "stream": True})}[proto]
        with httpx.Client(timeout=WAIT) as http, http.stream("POST", srv.url + path, json=dict(body, **extra)) as r:
            assert r.status_code == 200
            next(r.iter_raw())
            first_chunk.set()
    left.set()
    t.join(WAIT)
    assert not t.is_alive()
    with engine._cond:
        assert engine._cond.wait_for(lambda: not any(s.busy for s in engine.slots), WAIT)
    assert at_leave, "no pass ran after the client left"
    leaver_slot = engine._recent["LEAVER"].slot
    later = [k for k, ids in enumerate(passes.slots) if k > at_leave[0] and leaver_slot in ids]
    assert later == [], f"the departed client's slot ran in passes {later} after the one it left during"
    assert got["other"] == expected                   # the other slot's stream went on, as it runs alone
    assert len(engine._recent["LEAVER"].text) < 100


def test_a_prompt_longer_than_a_slot_is_answered_clearly(server, passes):
    srv, manager = server
    engine = manager._engine
    long_prompt = "the llama walks " * 200              # far more tokens than one slot's 128
    expected = alone(srv.url, "Once upon a time", 30)
    running = threading.Event()
    passes.gate = lambda k, chunks: running.set()
    got: dict = {}

    def stream() -> None:
        with httpx.Client(timeout=WAIT) as http, http.stream(
                "POST", srv.url + "/api/extra/generate/stream",
                json={"prompt": "Once upon a time", "max_length": 30, "use_default_badwordsids": True,
                      **GREEDY}) as r:
            got["text"] = kobold_text(r.read())
    t = threading.Thread(target=stream)
    t.start()
    assert running.wait(WAIT)
    with httpx.Client(timeout=WAIT) as http:
        # the newest part of a prompt that does not fit is kept (KoboldCpp's and llama.cpp's truncation), with room
        # for the answer: a normal answer in each protocol, its prompt counted within the slot's context
        r = http.post(srv.url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 4, **GREEDY})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] and 0 < r.json()["usage"]["prompt_tokens"] <= N_CTX - 4
        r = http.post(srv.url + "/api/v1/generate", json={"prompt": long_prompt, "max_length": 4, **GREEDY})
        assert r.status_code == 200 and r.json()["results"][0]["text"], r.text
        # a part that must be kept (KoboldCpp's memory) and cannot fit: 400 naming the context, nothing queued
        r = http.post(srv.url + "/api/v1/generate", json={"prompt": "Hi", "memory": long_prompt, "max_length": 4})
        assert r.status_code == 400 and f"context of {N_CTX} tokens" in r.json()["detail"]["msg"], r.text
        r = http.post(srv.url + "/api/extra/generate/stream", json={"prompt": "Hi", "memory": long_prompt,
                                                                     "max_length": 4})
        assert r.status_code == 400 and f"context of {N_CTX} tokens" in r.json()["detail"]["msg"], r.text
    t.join(WAIT)
    assert got["text"] == expected
    assert alone(srv.url, "Once upon a time", 30) == expected        # and it serves on


def test_abort_by_genkey_mid_prefill(server, passes):
    srv, manager = server
    engine = manager._engine
    other_prompt = "In a land far away"
    expected = alone(srv.url, other_prompt, 30)
    prompt = "The quick brown fox jumps over the lazy dog while the llama sleeps in the sun. " * 3
    n_prompt = len(manager.tokenize(prompt))
    assert 3 * PREFILL_CHUNK < n_prompt < N_CTX - 8          # several chunks, and it fits with its answer
    passes.slots.clear()
    in_prefill, aborted = threading.Event(), threading.Event()
    at_abort: list[int] = []

    def pre_slot():
        return next((s.id for s in engine.slots if s.busy and s.job.genkey == "PRE"), None)

    def gate(k: int, chunks: dict) -> None:
        sid = pre_slot()
        if sid is not None and chunks.get(sid, 0) > 1 and not at_abort and len(engine.slots[sid].tokens) > 1:
            in_prefill.set()           # a later chunk of its prompt: hold the pass until the abort is in
            assert aborted.wait(WAIT)
            at_abort.append(k)
    passes.gate = gate
    got: dict = {}

    def stream(key: str, text: str, n: int) -> None:
        with httpx.Client(timeout=WAIT) as http, http.stream(
                "POST", srv.url + "/api/extra/generate/stream",
                json={"prompt": text, "max_length": n, "genkey": key, "use_default_badwordsids": True,
                      **GREEDY}) as r:
            got[key] = parse_kobold_sse(r.read())
    threads = [threading.Thread(target=stream, args=("OTHER", other_prompt, 30)),
               threading.Thread(target=stream, args=("PRE", prompt, 4))]
    for t in threads:
        t.start()
    assert in_prefill.wait(WAIT), "the prompt was never evaluated in chunks"
    r = httpx.post(srv.url + "/api/extra/abort", json={"genkey": "PRE"}, timeout=WAIT)
    assert r.json()["success"] in (True, "true")
    aborted.set()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert got["PRE"][0] == ""                               # ended before its first token (of 4)
    assert got["OTHER"] == (expected, "length")
    sid = engine._recent["PRE"].slot
    later = [k for k, ids in enumerate(passes.slots) if k > at_abort[0] and sid in ids]
    assert later == [], f"the aborted prompt's slot ran in passes {later}"
    kept = len(engine.slots[sid].tokens)
    assert PREFILL_CHUNK <= kept < n_prompt
    # the same prompt again: the chunks evaluated before the abort are reused, the rest evaluated, 4 tokens come
    passes.gate = None
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True,
                                                       **GREEDY}, timeout=WAIT).json()
    assert r["usage"]["completion_tokens"] == 4
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= kept
