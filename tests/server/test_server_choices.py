"""`n` > 1 (swipes): distinct choices, the seed advancing per choice as llama.cpp's child completions do
(seed + 1, + 2, ...), streamed and not, through the OpenAI routes, which are also text-generation-webui's API."""
from __future__ import annotations

import json

import openai
import pytest
from starlette.testclient import TestClient

from fakes import live


@pytest.fixture
def client(demo_app):
    return TestClient(demo_app)


def events(raw: bytes) -> list[dict]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(json.loads(block[6:]))
    assert raw.endswith(b"data: [DONE]\n\n")
    return out


BODY = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "top_p": 1.0, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "temperature": 1.0,
        "ignore_eos": True}


@pytest.mark.parametrize("route, body, text", [
    ("/v1/completions", BODY, lambda c: c["text"]),
    ("/v1/chat/completions", CHAT, lambda c: c["message"]["content"]),
])
def test_n_three_gives_three_different_texts(client, route, body, text):
    for seed in (None, 11):
        r = client.post(route, json=dict(body, n=3, seed=seed)).json()
        texts = [text(c) for c in r["choices"]]
        assert [c["index"] for c in r["choices"]] == [0, 1, 2] and len(set(texts)) == 3
        assert r["usage"]["completion_tokens"] == 36
    # seeded: reproducible, and choice i is what a single request with seed + i gives
    a = client.post(route, json=dict(body, n=3, seed=11)).json()
    assert [text(c) for c in a["choices"]] == [text(c) for c in r["choices"]]
    for i in range(3):
        one = client.post(route, json=dict(body, seed=11 + i)).json()
        assert text(one["choices"][0]) == text(a["choices"][i])


# What a text-generation-webui client sends to its API (extensions/openai/typing.py GenerationOptions, commit
# 02678ae4): the OpenAI fields plus its own. text-generation-webui itself ignores `n` ("Unused parameter").
TGW_FIELDS = {"preset": None, "min_p": 0, "top_k": 0, "typical_p": 1, "tfs": 1, "top_a": 0, "repetition_penalty": 1,
              "repetition_penalty_range": 1024, "do_sample": True, "seed": -1, "dry_multiplier": 0,
              "dry_sequence_breakers": '"\\n", ":", "\\"", "*"', "xtc_threshold": 0.1, "xtc_probability": 0,
              "smoothing_factor": 0, "custom_token_bans": "", "auto_max_new_tokens": False, "ban_eos_token": True,
              "add_bos_token": True, "skip_special_tokens": True, "grammar_string": ""}


@pytest.mark.parametrize("route, body, text", [
    ("/v1/completions", dict(TGW_FIELDS, prompt="Once upon a time", max_tokens=12, temperature=1.0),
     lambda c: c["text"]),
    ("/v1/chat/completions", dict(TGW_FIELDS, messages=CHAT["messages"], max_tokens=12, temperature=1.0,
                                  mode="instruct", user_bio=""), lambda c: c["message"]["content"]),
])
def test_n_three_with_text_generation_webui_fields(client, route, body, text):
    for stream in (False, True):
        r = client.post(route, json=dict(body, n=3, stream=stream))
        assert r.status_code == 200, r.text
        if stream:
            got = ["", "", ""]
            for ev in events(r.content):
                for ch in ev["choices"]:
                    got[ch["index"]] += ch.get("text") or ch.get("delta", {}).get("content") or ""
        else:
            got = [text(c) for c in r.json()["choices"]]
        assert len(set(got)) == 3 and all(got), got


@pytest.mark.parametrize("route, body, piece", [
    ("/v1/completions", BODY, lambda ch: ch.get("text", "")),
    ("/v1/chat/completions", CHAT, lambda ch: ch.get("delta", {}).get("content") or ""),
])
def test_streamed_choices_match_the_blocking_ones(client, route, body, piece):
    whole = client.post(route, json=dict(body, n=3, seed=5)).json()
    want = [c.get("text", c.get("message", {}).get("content")) for c in whole["choices"]]
    r = client.post(route, json=dict(body, n=3, seed=5, stream=True, stream_options={"include_usage": True}))
    evs = events(r.content)
    got, finished = ["", "", ""], []
    for ev in evs[:-1]:
        (ch,) = ev["choices"]
        got[ch["index"]] += piece(ch)
        if ch["finish_reason"] is not None:
            finished.append(ch["index"])
    assert got == want and finished == [0, 1, 2]
    # the same counts; the cached prompt tokens differ (the second request finds the first one's prompt cached)
    cached = lambda u: {k: v for k, v in u.items() if k != "prompt_tokens_details"}  # noqa: E731
    assert evs[-1]["choices"] == [] and cached(evs[-1]["usage"]) == cached(whole["usage"])


def test_several_prompts_times_n(client):
    r = client.post("/v1/completions", json=dict(BODY, prompt=["Once upon a time", "The llama"], n=2, seed=3)).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for k, p in enumerate(["Once upon a time", "The llama"]):
        for i in range(2):
            one = client.post("/v1/completions", json=dict(BODY, prompt=p, seed=3 + i)).json()
            assert one["choices"][0]["text"] == r["choices"][2 * k + i]["text"]
    assert r["usage"]["prompt_tokens"] == sum(
        client.post("/v1/completions", json=dict(BODY, prompt=p, max_tokens=1)).json()["usage"]["prompt_tokens"]
        for p in ["Once upon a time", "The llama"])


@pytest.mark.parametrize("body", [dict(BODY, n=9), dict(BODY, n=0), dict(BODY, n=[3]), dict(BODY, n=10**9),
                                  dict(BODY, prompt=["a", "b", "c"], n=3)])
def test_too_many_choices_is_a_400(client, body):
    routes = [("/v1/completions", body, BODY)]
    if isinstance(body["prompt"], str):
        routes.append(("/v1/chat/completions", dict(CHAT, n=body["n"]), CHAT))
    for route, bad, good in routes:
        for stream in (False, True):
            r = client.post(route, json=dict(bad, stream=stream))
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] in ("n", "prompt") and err["param"] in err["message"]
        assert client.post(route, json=dict(good, n=2)).status_code == 200


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_the_openai_sdk_reads_streamed_choices(demo_app):
    with live(demo_app) as srv:
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        got: dict[int, str] = {}
        for chunk in oc.chat.completions.create(model="any", messages=CHAT["messages"], max_tokens=8, n=2, seed=1,
                                                temperature=1.0, stream=True):
            for ch in chunk.choices:
                got[ch.index] = got.get(ch.index, "") + (ch.delta.content or "")
        assert sorted(got) == [0, 1] and got[0] != got[1]
