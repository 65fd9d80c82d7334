"""Seeded request fuzzing over every generation/token route of every adapter: each hostile body
gets the protocol's error shape (4xx) or a valid answer, never a 5xx, and the next normal request still works.

They run against the real engine on the demo model with a 64-token context, so every case ends quickly."""
from __future__ import annotations

import json
import random

from starlette.testclient import TestClient

from fakes import make_app

SEED = 20240501
N_CASES = 300

ROUTES = {   # path -> (base body, error key of the protocol)
    "/api/v1/generate": ({"prompt": "hi", "max_length": 8}, "detail"),
    "/api/extra/generate/stream": ({"prompt": "hi", "max_length": 8}, "detail"),
    "/api/extra/tokencount": ({"prompt": "hi"}, "detail"),
    "/api/extra/detokenize": ({"ids": [40, 41]}, "detail"),
    "/api/extra/generate/check": ({"genkey": "KCPP1"}, "detail"),
    "/api/extra/abort": ({"genkey": "KCPP1"}, "detail"),
    "/api/v1/chat": ({"user_input": "hi", "max_new_tokens": 8}, "detail"),
    "/api/v1/token-count": ({"prompt": "hi"}, "detail"),
    "/api/v1/model": ({"action": "info"}, "detail"),
    "/v1/completions": ({"prompt": "hi", "max_tokens": 8}, "error"),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, "error"),
    "/v1/internal/encode": ({"text": "hi"}, "error"),
    "/v1/internal/decode": ({"tokens": [40, 41]}, "error"),
    "/v1/internal/token-count": ({"text": "hi"}, "error"),
}
FIELDS = ["prompt", "max_length", "max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "min_p",
          "typical", "tfs", "top_a", "rep_pen", "rep_pen_range", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "mirostat", "mirostat_tau", "sampler_order", "sampler_seed", "seed", "stop_sequence",
          "stop", "stopping_strings", "logit_bias", "banned_tokens", "custom_token_bans", "grammar", "genkey", "n",
          "messages", "history", "user_input", "ids", "tokens", "text", "stream", "trim_stop", "memory",
          "dynatemp_range", "logprobs", "echo", "max_context_length", "action", "sampler_priority", "temperature_last",
          "unknown_field_xyz"]
NASTY = [None, True, False, -1, 0, 1, -10**9, 10**18, 2**64, 1e308, -1e308, 3.5, "", "x", "NaN", "1e999", "\ud800",
         "a" * 5000, [], [1, 2], [-1], [10**9], ["a"], [[1]], {}, {"a": 1}, {"1": 1e300}, [6, 0, 1, 3, 4, 2, 5],
         [99, 0], {"messages": []}, [{"role": "user"}], [{"role": "user", "content": ["x"]}],
         {str(i): 5 for i in range(3000)}]


def hostile_body(rng: random.Random, base: dict) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([b"{", b"[1,", b"nul", b"\xff\xfe\xfd", b'{"a": NaN}', b'{"a": -Infinity}', b"1",
                           b'"s"', b"[]", b"{" * 50 + b"}" * 50, b""])
    body = dict(base)
    for _ in range(rng.randrange(1, 5)):
        body[rng.choice(FIELDS)] = rng.choice(NASTY)
    text = json.dumps(body)
    if kind == 1:   # literal non-finite numbers, which Python's json would otherwise accept
        text = text.replace("1e+308", "Infinity", 1)
    return text.encode("utf-8", errors="surrogatepass")


NORMAL = {"prompt": "x", "max_length": 3, "use_default_badwordsids": True}


def test_fuzz_every_route_never_5xx_and_keeps_serving(small_demo_engine):
    engine = small_demo_engine
    client = TestClient(make_app(engine, n_ctx=64), raise_server_exceptions=False)
    rng = random.Random(SEED)
    paths = sorted(ROUTES)
    seen_4xx = seen_ok = 0
    for case in range(N_CASES):
        path = rng.choice(paths)
        base, key = ROUTES[path]
        raw = hostile_body(rng, base)
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (case, path, raw[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            seen_4xx += 1
            assert key in r.json(), (case, path, raw[:200], r.text[:300])
        else:
            seen_ok += 1
            if path.endswith("stream"):
                assert r.text.endswith("\n\n")
        if case % 25 == 0:
            ok = client.post("/api/v1/generate", json=NORMAL)
            assert ok.status_code == 200 and engine.perf()["last_token_count"] == 3, case
    assert seen_4xx > 50 and seen_ok > 20          # the fuzzer exercised both paths
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_huge_prompt_beyond_the_context(small_demo_engine):
    client = TestClient(make_app(small_demo_engine, n_ctx=64))
    prompt = "word " * 2_000_000                      # 10 MB: the start is dropped to fit, as KoboldCpp does
    r = client.post("/api/v1/generate", json=dict(NORMAL, prompt=prompt))
    assert r.status_code == 200 and small_demo_engine.perf()["last_token_count"] == 3
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= 64


def test_websocket_fuzz_keeps_the_socket_and_the_server(small_demo_engine):
    client = TestClient(make_app(small_demo_engine, n_ctx=64))
    rng = random.Random(SEED + 1)
    with client.websocket_connect("/api/v1/stream") as ws:
        for case in range(40):
            ws.send_text(hostile_body(rng, {"prompt": "hi", "max_new_tokens": 4}).decode("utf-8", "replace"))
            while (m := ws.receive_json())["event"] != "stream_end":
                assert m["event"] in ("text_stream", "error"), m
        ws.send_text('{"prompt": "x", "max_new_tokens": 2}')
        assert ws.receive_json()["event"] == "text_stream"
