"""--parallel N through the server on the demo model: concurrent KoboldCpp streams with genkeys each get their own
text, /api/extra/generate/check and abort by genkey find the right slot, llama.cpp's GET /slots and GET /metrics
(Prometheus text, parsed with prometheus_client's parser) show the slots and the counters, behind the API key."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakes import demo_manager, live, make_app

KEY = {"Authorization": "Bearer k"}
PROMPTS = ["Once upon a time", "The forest was quiet", "USER: Hello\nASSISTANT:", "In a land far away"]


@pytest.fixture(scope="module")
def parallel_server(demo_model):
    manager = demo_manager(demo_model, 256, multiuser=4, parallel=4)
    app = make_app(manager, n_ctx=256, multiuser=4, parallel=4, api_key="k")
    with live(app) as srv:
        yield srv, manager
    manager.unload()


def kobold_text(raw: bytes) -> tuple[str, str]:
    events = [json.loads(e.split(b"\n")[1][6:]) for e in raw.split(b"\n\n")[:-1]]
    return "".join(e["token"] for e in events), events[-1]["finish_reason"]


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_concurrent_streams_each_equal_their_text_alone(parallel_server):
    srv, manager = parallel_server
    body = {"max_length": 24, "temperature": 0, "rep_pen": 1.0}
    with httpx.Client(timeout=60, headers=KEY) as http:
        alone = [http.post(srv.url + "/api/v1/generate", json={"prompt": p, **body}).json()["results"][0]["text"]
                 for p in PROMPTS]
    got: dict = {}

    def stream(i: int) -> None:
        with httpx.Client(timeout=60, headers=KEY) as http:
            with http.stream("POST", srv.url + "/api/extra/generate/stream",
                             json={"prompt": PROMPTS[i], "genkey": f"KCPP{i}", **body}) as r:
                got[i] = kobold_text(r.read())[0]
            check = http.post(srv.url + "/api/extra/generate/check", json={"genkey": f"KCPP{i}"}).json()
            got[f"check{i}"] = check["results"][0]["text"]
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(4)] == alone
    assert [got[f"check{i}"] for i in range(4)] == alone        # check by genkey: that request's text, no other


def test_abort_by_genkey_stops_only_that_stream(parallel_server):
    srv, manager = parallel_server
    seen: dict = {}
    started = threading.Event()

    def stream(i: int) -> None:
        with httpx.Client(timeout=60, headers=KEY) as http:
            with http.stream("POST", srv.url + "/api/extra/generate/stream",
                             json={"prompt": PROMPTS[i], "genkey": f"AB{i}", "max_length": 200,
                                   "temperature": 0, "rep_pen": 1.0, "use_default_badwordsids": True}) as r:
                raw = b""
                for chunk in r.iter_bytes():
                    raw += chunk
                    if i == 0 and b"\n\n" in raw:
                        started.set()
            seen[i] = kobold_text(raw)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert started.wait(60)
    with httpx.Client(timeout=60, headers=KEY) as http:
        slots = http.get(srv.url + "/slots").json()
        assert len(slots) == 4 and sum(s["is_processing"] for s in slots) >= 1
        assert http.post(srv.url + "/api/extra/abort", json={"genkey": "AB0"}).json()["success"] in (True, "true")
    for t in threads:
        t.join(60)
    text0, _ = seen[0]
    text1, _ = seen[1]
    assert len(manager.tokenize(text1, add_bos=False)) >= 150 > len(manager.tokenize(text0, add_bos=False))


def test_slots_and_metrics_routes(parallel_server):
    srv, manager = parallel_server
    with httpx.Client(timeout=60) as http:
        assert http.get(srv.url + "/slots").status_code == 401            # behind the API key
        assert http.get(srv.url + "/metrics").status_code == 401
        http.post(srv.url + "/v1/completions", headers=KEY, json={"prompt": "Hello", "max_tokens": 5})
        slots = http.get(srv.url + "/slots", headers=KEY).json()
        assert [s["id"] for s in slots] == [0, 1, 2, 3] and all(s["n_ctx"] == 256 for s in slots)
        r = http.get(srv.url + "/metrics", headers=KEY)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert values["llamacpp:tokens_predicted_total"] >= 5 and values["llamacpp:prompt_tokens_total"] >= 1
    assert values["llamacpp:requests_processing"] == 0 and values["llamacpp:requests_deferred"] == 0
    assert 0 < values["llamacpp:kv_cache_usage_ratio"] <= 1 and values["llamacpp:n_decode_total"] >= 5
