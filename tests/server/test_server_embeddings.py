"""The embeddings routes: OpenAI's /v1/embeddings (also through the openai SDK) and KoboldCpp's /api/extra/embeddings,
with the same vectors as the engine, and their refusals (400 naming the field; the server keeps serving)."""
from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from starlette.testclient import TestClient

from fakes import demo_manager, live, make_app


@pytest.fixture(scope="module")
def engine(demo_model):
    return demo_manager(demo_model, 512)


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_routes_openai_sdk_and_kobold(engine):
    app = make_app(engine, n_ctx=512)
    c = TestClient(app)
    texts = ["first text", "second, longer text"]
    r = c.post("/v1/embeddings", json={"model": "x", "input": texts})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and len(body["data"]) == 2
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    n_tokens = sum(len(engine.tokenize(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    expect = engine.embed([engine.tokenize(t) for t in texts])
    for d, e in zip(body["data"], expect):
        np.testing.assert_array_equal(np.array(d["embedding"], np.float32), e)
    b64 = c.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()["data"][0]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b64["embedding"]), "<f4"), expect[0])
    ids = c.post("/v1/embeddings", json={"input": [engine.tokenize(texts[1])]}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.array(ids, np.float32), expect[1])
    # KoboldCpp's route: same shape (SillyTavern reads data[].embedding and model); its version says so
    k = c.post("/api/extra/embeddings", json={"input": texts})
    assert k.status_code == 200 and [d["embedding"] for d in k.json()["data"]] == [d["embedding"]
                                                                                for d in body["data"]]
    assert isinstance(k.json()["model"], str) and c.get("/api/extra/version").json()["embeddings"] is True
    with live(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="any", input=texts)        # the SDK asks for base64 and decodes it
        assert [len(d.embedding) for d in got.data] == [engine.model_info()["n_embd"]] * 2
        np.testing.assert_allclose(np.array(got.data[1].embedding), expect[1], rtol=0, atol=0)


@pytest.mark.parametrize("body, param, words", [
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ({"input": []}, "input", "not empty"),
    ({"input": [[1, 2], "x", 3]}, "input", "input[2]"),
    ({"input": [[1, 99999]]}, "input", "outside"),
    ({"input": "word " * 600}, "input", "tokens"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "base64"),
    ({"input": "x", "dimensions": 3}, "dimensions", "dimensions"),
])
def test_bad_embedding_requests_are_400_and_the_server_keeps_serving(engine, body, param, words):
    c = TestClient(make_app(engine, n_ctx=512))
    r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    k = c.post("/api/extra/embeddings", json=dict(body, truncate=False))
    assert k.status_code == 400 and "detail" in k.json()
    assert c.post("/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_long_input_is_cut_when_truncate_is_asked(engine):
    c = TestClient(make_app(engine, n_ctx=512))
    long_text = "word " * 600
    k = c.post("/api/extra/embeddings", json={"input": long_text})       # KoboldCpp truncates by default
    assert k.status_code == 200 and k.json()["usage"]["prompt_tokens"] == engine.n_batch
    v = c.post("/v1/embeddings", json={"input": long_text, "truncate": True})
    assert v.json()["data"][0]["embedding"] == k.json()["data"][0]["embedding"]
