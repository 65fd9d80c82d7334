"""Logprobs through every protocol: KoboldCpp's `logprobs: true` and /api/extra/last_logprobs (shapes of KoboldCpp
1.77's koboldcpp.py parse_last_logprobs: the sampler's final candidates, 5 alternatives), OpenAI's logprobs /
top_logprobs (the model's own distribution), text-generation-webui's /v1/internal/logits."""
from __future__ import annotations

import json
import math

import pytest
from starlette.testclient import TestClient


@pytest.fixture
def client(demo_app):
    return TestClient(demo_app)


KOBOLD = {"prompt": "Once upon a time", "max_length": 10, "sampler_seed": 4, "temperature": 0.8,
          "use_default_badwordsids": True}


def check_kobold_shape(lp: dict, text: str) -> None:
    n = len(lp["tokens"])
    assert "".join(lp["tokens"]) == text and n == 10
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(lp["content"]) == n
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    assert lp["text_offset"] == offsets
    for c, tops in zip(lp["content"], lp["top_logprobs"]):
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"} and c["bytes"] == list(c["token"].encode())
        assert 1 <= len(c["top_logprobs"]) <= 5 and tops == {t["token"]: t["logprob"] for t in c["top_logprobs"]}
        assert all(t["logprob"] <= 0 for t in c["top_logprobs"])


def test_kobold_logprobs_are_the_final_candidates(client):
    r = client.post("/api/v1/generate", json=dict(KOBOLD, logprobs=True)).json()["results"][0]
    check_kobold_shape(r["logprobs"], r["text"])
    assert "logprobs" not in client.post("/api/v1/generate", json=KOBOLD).json()["results"][0]
    # after top_k 3 only three candidates are left: their probabilities are all there is
    r = client.post("/api/v1/generate", json=dict(KOBOLD, logprobs=True, top_k=3)).json()["results"][0]
    for c in r["logprobs"]["content"]:
        assert len(c["top_logprobs"]) <= 3
        assert sum(math.exp(t["logprob"]) for t in c["top_logprobs"]) == pytest.approx(1.0)
        assert c["token"] in [t["token"] for t in c["top_logprobs"]]
    # greedy leaves one candidate: probability 1
    r = client.post("/api/v1/generate", json=dict(KOBOLD, logprobs=True, temperature=0)).json()["results"][0]
    assert all(x == 0.0 for x in r["logprobs"]["token_logprobs"])


def test_last_logprobs_after_a_stream_by_genkey(client):
    body = dict(KOBOLD, genkey="KCPP-LP1")
    r = client.post("/api/extra/generate/stream", json=body)
    text = "".join(json.loads(line[6:])["token"] for line in r.text.splitlines() if line.startswith("data: "))
    lp = client.post("/api/extra/last_logprobs", json={"genkey": "KCPP-LP1"}).json()["logprobs"]
    check_kobold_shape(lp, text)
    whole = client.post("/api/v1/generate", json=dict(body, logprobs=True)).json()["results"][0]["logprobs"]
    assert whole == lp                                      # same seed: the same tokens and candidates
    # another user's key, or none while the last request had one: nothing (KoboldCpp's multiuser rule)
    assert client.post("/api/extra/last_logprobs", json={"genkey": "someone-else"}).json() == {"logprobs": None}
    assert client.post("/api/extra/last_logprobs").json() == {"logprobs": None}
    assert client.get("/api/extra/last_logprobs").json() == {"logprobs": None}
    client.post("/api/v1/generate", json=KOBOLD)            # no genkey: visible without one
    assert client.get("/api/extra/last_logprobs").json()["logprobs"]["tokens"]


def test_openai_chat_top_logprobs_counts(client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 1.0, "seed": 2,
            "ignore_eos": True}
    for top, want in ((0, 0), (3, 3), (20, 20)):
        r = client.post("/v1/chat/completions", json=dict(body, logprobs=True, top_logprobs=top)).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
        assert all(len(c["top_logprobs"]) == want for c in content)
    r = client.post("/v1/chat/completions", json=dict(body, logprobs=True, top_logprobs=2, stream=True))
    chunks = [json.loads(b[6:]) for b in r.content.split(b"\n\n") if b.startswith(b"data: {")]
    streamed = [c for ch in chunks for c in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert len(streamed) == 5 and all(len(c["top_logprobs"]) == 2 for c in streamed)
    assert client.post("/v1/chat/completions", json=dict(body, logprobs=True, top_logprobs=21)).status_code == 400


def test_openai_logprobs_are_the_models_own(client):
    # the raw distribution does not change with the sampler settings
    base = {"prompt": "Once upon a time", "max_tokens": 1, "logprobs": 5, "seed": 1}
    a = client.post("/v1/completions", json=dict(base, temperature=0.2)).json()["choices"][0]["logprobs"]
    b = client.post("/v1/completions", json=dict(base, temperature=1.5, top_k=2)).json()["choices"][0]["logprobs"]
    assert a["top_logprobs"] == b["top_logprobs"]
    assert sum(math.exp(v) for v in a["top_logprobs"][0].values()) < 1.0


def test_textgen_internal_logits(client):
    body = {"prompt": "Once upon a time"}
    raw = client.post("/v1/internal/logits", json=body).json()
    assert len(raw) == 50 and all(0 < p < 1 for p in raw.values())
    probs = list(raw.values())
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
    lp = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 1, "logprobs": 5,
                                              "seed": 1}).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    for tok, v in lp.items():
        assert raw[tok] == pytest.approx(math.exp(v))
    sampled = client.post("/v1/internal/logits", json=dict(body, use_samplers=True, top_k=3, temperature=0.7,
                                                           top_logits=10)).json()
    assert len(sampled) == 3 and sum(sampled.values()) == pytest.approx(1.0)
    assert set(sampled) == set(list(raw)[:3])
    assert len(client.post("/v1/internal/logits", json=dict(body, top_logits=7)).json()) == 7
    for bad, param in (({"top_logits": 0}, "top_logits"), ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"),
                       ({"temperature": "x"}, "temperature")):
        r = client.post("/v1/internal/logits", json=dict(body, **bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == param
