"""KoboldAI United / KoboldCpp API: the routes of KoboldCpp 1.76 (`koboldcpp.py`) against the real engine (demo model),
the `koboldapi` client over a real socket, and KoboldCpp's exact SSE framing."""
from __future__ import annotations

from airobackend.adapters.kobold import kobold_model_name

import json
import re

import pytest
from starlette.testclient import TestClient

from airobackend.errors import RequestError
from airobackend.types import FinishReason

from fakes import live, make_app, pick_stop, scripted_engine

SSE_EVENT = re.compile(rb"event: message\ndata: ([^\n]*)\n\n")


def sse_events(raw: bytes) -> list[dict]:
    """Split a Kobold SSE body exactly as KoboldAI Lite's regex does; every byte must belong to an event."""
    assert b"\r" not in raw
    events, pos = [], 0
    for m in SSE_EVENT.finditer(raw):
        assert m.start() == pos, raw[pos:m.start()]
        events.append(json.loads(m.group(1)))
        pos = m.end()
    assert pos == len(raw)
    return events


@pytest.fixture
def client(demo_app):
    return TestClient(demo_app)


def test_probes_say_koboldcpp_with_the_loaded_model(client, demo_engine):
    name = kobold_model_name(demo_engine.model_info()["name"])
    assert client.get("/api/v1/model").json() == {"result": f"koboldcpp/{name}"}
    assert client.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    v = client.get("/api/extra/version").json()
    assert v["result"] == "KoboldCpp" and v["protected"] is False
    assert float(v["version"]) >= 1.74        # Lite enables SSE streaming, grammar, DRY/XTC fields by version
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 256}
    assert client.get("/api/extra/true_max_context_length").json()["value"] == 256
    assert 0 < client.get("/api/v1/config/max_length").json()["value"] <= 256
    assert client.get("/api/extra/preloadstory").json() == {}
    assert client.get("/sdapi/v1/sd-models").json() == []
    # KoboldCpp matches paths with a trailing slash and under /api/latest
    assert client.get("/api/latest/model/").json() == {"result": f"koboldcpp/{name}"}


def test_generate_is_seeded_and_stops_at_max_length(client, demo_engine):
    body = {"prompt": "Once upon a time", "max_length": 12, "sampler_seed": 42, "temperature": 0.8}
    a = client.post("/api/v1/generate", json=body).json()
    b = client.post("/api/v1/generate", json=body).json()
    assert a == b
    assert a["results"][0]["finish_reason"] == "length"
    assert client.get("/api/extra/perf").json()["last_token_count"] == 12
    # same request with another seed: another text
    c = client.post("/api/v1/generate", json=dict(body, sampler_seed=43)).json()
    assert c["results"][0]["text"] != a["results"][0]["text"]


def test_stream_carries_the_same_text_as_generate_in_koboldcpp_framing(client):
    body = {"prompt": "The llama", "max_length": 10, "sampler_seed": 7, "genkey": "KCPP4321"}
    text = client.post("/api/v1/generate", json=body).json()["results"][0]["text"]
    r = client.post("/api/extra/generate/stream", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r.content)
    assert all(e["finish_reason"] == "null" for e in events[:-1])     # the string "null", as KoboldCpp sends
    assert events[-1]["finish_reason"] == "length"
    assert "".join(e["token"] for e in events) == text
    assert client.post("/api/extra/generate/check", json={"genkey": "KCPP4321"}).json() == \
        {"results": [{"text": text}]}


def test_tokencount_tokenize_detokenize(client, demo_engine):
    text = "Hello llamas, how are you?"
    r = client.post("/api/extra/tokencount", json={"prompt": text}).json()
    assert r["ids"] == demo_engine.tokenize(text, add_bos=True) and r["value"] == len(r["ids"])
    no_bos = client.post("/api/extra/tokencount", json={"prompt": text, "special": False}).json()
    assert no_bos["ids"] == r["ids"][1:]
    assert client.post("/api/extra/tokenize", json={"prompt": text}).json() == r
    back = client.post("/api/extra/detokenize", json={"ids": no_bos["ids"]}).json()
    # SentencePiece: the first piece carries the word's leading space; the engine decides how it is rendered
    assert back == {"result": demo_engine.detokenize(no_bos["ids"]), "success": True}
    assert back["result"].lstrip() == text
    bad = client.post("/api/extra/detokenize", json={"ids": [10**9]})
    assert bad.status_code == 400 and bad.json()["detail"]["type"] == "bad_input"


def test_unknown_fields_and_client_dialects_are_accepted(client):
    # SillyTavern KoboldAI-Classic body (United flags it sends, which KoboldCpp ignores) and koboldapi's `temp`
    body = {"prompt": "Hi", "use_story": False, "use_memory": False, "use_authors_note": False,
            "use_world_info": False, "max_context_length": 4096, "max_length": 4, "rep_pen": 1.1,
            "rep_pen_range": 320, "rep_pen_slope": 0.7, "temperature": 0.7, "tfs": 1, "top_a": 0, "top_k": 40,
            "top_p": 0.9, "min_p": 0.05, "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False,
            "use_default_badwordsids": False, "mirostat": 0, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "",
            "sampler_seed": 1, "stop_sequence": ["\nYou:"], "temp": 0, "n": 1, "images": [], "quiet": True,
            "dry_multiplier": 0.8, "xtc_probability": 0.5, "smoothing_factor": 0.2, "some_future_field": {"x": 1}}
    r = client.post("/api/v1/generate", json=body)
    assert r.status_code == 200 and r.json()["results"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("body,field", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_length": "many"}, "max_length"),
    ({"prompt": "x", "max_length": -3}, "max_length"),
    ({"prompt": "x", "temperature": [1]}, "temperature"),
    ({"prompt": "x", "sampler_order": [6, 0, 9]}, "sampler_order"),
    ({"prompt": "x", "sampler_order": [6, 6]}, "sampler_order"),
    ({"prompt": "x", "stop_sequence": [1, 2]}, "stop_sequence"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "mirostat": 3}, "mirostat"),
    ({"prompt": "x", "rep_pen": 0}, "rep_pen"),
])
def test_bad_fields_get_koboldcpp_error_shape_and_server_keeps_serving(client, body, field):
    for route in ("/api/v1/generate", "/api/extra/generate/stream"):
        r = client.post(route, json=body)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail["type"] == "bad_input" and field in detail["msg"]
    assert client.post("/api/v1/generate", json={"prompt": "x", "max_length": 2}).status_code == 200


def test_mapping_defaults_and_aliases():
    from airobackend.adapters.kobold import to_generation_request

    req = to_generation_request({"prompt": "p"}, n_ctx=2048, n_vocab=32000)
    s = req.sampling
    assert (req.max_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.repetition_penalty_range) == \
        (180, 0.7, 0.92, 100, 1.0, 320)
    assert req.trim_stop is False and req.stop == () and s.seed is None and not s.ban_eos
    req = to_generation_request({"prompt": "p", "max_length": 10**9, "rep_pen": 1.05, "repetition_penalty": 1.2,
                                 "use_default_badwordsids": True, "sampler_seed": -1, "memory": "M",
                                 "stop_sequence": [f"s{i}" for i in range(40)], "trim_stop": True,
                                 "custom_token_bans": "5, 7", "logit_bias": {"3": 500, "4": -1.5},
                                 "banned_tokens": ["bad word"], "genkey": "KCPP1"}, n_ctx=2048, n_vocab=32000)
    assert req.max_tokens == 2048 - 16                  # clamped like KoboldCpp
    assert req.sampling.repetition_penalty == 1.2       # the largest of the aliases
    assert req.sampling.ban_eos and req.trim_stop and req.memory == "M" and req.prompt == "p"
    assert len(req.stop) == 32
    assert req.sampling.banned_tokens == (5, 7) and req.sampling.banned_strings == ("bad word",)
    assert req.sampling.logit_bias == {3: 100.0, 4: -1.5}
    assert req.genkey == "KCPP1"
    assert to_generation_request({"prompt": "p", "ban_eos_token": False, "use_default_badwordsids": True},
                                 n_ctx=64, n_vocab=100).sampling.ban_eos is False


def test_stop_sequence_kept_unless_trim_stop_and_finish_reasons(client, demo_engine):
    base = {"prompt": "The old llama said", "max_length": 40, "sampler_seed": 9, "use_default_badwordsids": True}
    text = client.post("/api/v1/generate", json=base).json()["results"][0]["text"]
    i, stop = pick_stop(text)
    r = client.post("/api/v1/generate", json=dict(base, stop_sequence=[stop])).json()
    # KoboldCpp returns the stop string unless trim_stop (with the rest of the token that completed it: its whole
    # output so far), and reports a custom stop as "length"
    kept = r["results"][0]["text"]
    assert r["results"][0]["finish_reason"] == "length"
    assert kept.startswith(text[:i + len(stop)]) and text.startswith(kept) and len(kept) - i - len(stop) < 16
    r = client.post("/api/v1/generate", json=dict(base, stop_sequence=[stop], trim_stop=True)).json()
    assert r["results"][0]["text"] == text[:i]
    events = sse_events(client.post("/api/extra/generate/stream",
                                    json=dict(base, stop_sequence=[stop], trim_stop=True)).content)
    assert "".join(e["token"] for e in events) == text[:i]
    # EOS is the only "stop": make it certain with a logit bias
    eos = {str(demo_engine.tokenizer.eos_id): 100}
    r = client.post("/api/v1/generate", json={"prompt": "x", "logit_bias": eos}).json()
    assert r == {"results": [{"text": "", "finish_reason": "stop"}]}
    events = sse_events(client.post("/api/extra/generate/stream", json={"prompt": "x", "logit_bias": eos}).content)
    assert events == [{"token": "", "finish_reason": "stop"}]
    # memory goes in front of the prompt (the engine keeps it on a context shift)
    client.post("/api/v1/generate", json={"prompt": " and then", "memory": "Long ago,", "max_length": 1})
    assert demo_engine.perf()["last_input_count"] == len(demo_engine.tokenize("Long ago, and then"))


def test_textgen_dialect_on_the_shared_generate_route(client):
    """text-generation-webui clients post to the same /api/v1/generate: their stop strings are cut."""
    base = {"prompt": "The old llama said", "max_new_tokens": 40, "seed": 9, "ban_eos_token": True}
    text = client.post("/api/v1/generate", json=base).json()["results"][0]["text"]
    i, stop = pick_stop(text)
    r = client.post("/api/v1/generate", json=dict(base, stopping_strings=[stop]))
    assert r.json()["results"][0]["text"] == text[:i]


def test_unknown_path_gets_koboldcpp_404(client):
    r = client.get("/nothing/here")
    assert r.status_code == 404 and "endpoint does not exist" in r.text
    r = client.post("/api/extra/nothing", json={})
    assert r.status_code == 404 and r.json()["detail"]["type"] == "not_found"


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_koboldapi_client_over_a_real_socket(demo_app, demo_engine):
    from koboldapi.core.api import KoboldAPI

    name = kobold_model_name(demo_engine.model_info()["name"])
    with live(demo_app) as srv:
        api = KoboldAPI(srv.url)
        assert api.get_version()["result"] == "KoboldCpp"
        assert api.get_model() == f"koboldcpp/{name}"
        assert api.get_max_context_length() == 256
        text = api.generate("Tell me about llamas.", max_length=8, sampler_seed=5)
        assert isinstance(text, str) and text
        assert api.check_generation() == text          # last generation under this client's genkey
        counted = api.count_tokens("a llama")
        assert counted["tokens"] == demo_engine.tokenize("a llama") and counted["count"] == len(counted["tokens"])
        ids = api.tokenize("a llama")
        assert api.detokenize(ids[1:]).lstrip() == "a llama"
        perf = api.get_performance_stats()
        assert perf["last_token_count"] == 8 and perf["idle"] == 1
        assert api.abort_generation() == "false"       # nothing of ours is running
        streamed = api.generate_sync("Tell me about llamas.", max_length=8, sampler_seed=5)
        assert streamed == text
        lp = api.get_last_logprobs()                   # the streamed generation's, under this client's genkey
        assert "".join(lp["tokens"]) == streamed and len(lp["content"]) == len(lp["tokens"])


def test_engine_error_classes_map_to_each_protocols_shape():
    """The core says what went wrong (server.describe_error); the adapters' error_response hooks shape it by path,
    and with no adapter answering the body is Starlette's plain one."""
    from airobackend.errors import ContextOverflowError, EngineBusy, ModelNotLoaded
    from airobackend.plugins import get_plugin_manager
    from airobackend.server import error_for_exception

    pm = get_plugin_manager(load_entrypoints=False)
    r = error_for_exception(pm, "/api/v1/generate", EngineBusy("x"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert json.loads(r.body) == {"detail": {"msg": "Server is busy; please try again later.",
                                             "type": "service_unavailable"}}
    r = error_for_exception(pm, "/api/v1/generate", ContextOverflowError("too long"))
    assert r.status_code == 400 and json.loads(r.body) == {"detail": {"msg": "too long", "type": "bad_input"}}
    r = error_for_exception(pm, "/api/v1/generate", ModelNotLoaded("no model is loaded"))
    assert r.status_code == 503 and json.loads(r.body)["detail"]["type"] == "service_unavailable"
    assert error_for_exception(pm, "/api/x", RequestError("bad")).status_code == 400
    r = error_for_exception(pm, "/v1/completions", ContextOverflowError("too long"))
    assert r.status_code == 400 and json.loads(r.body) == {"error": {
        "message": "too long", "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}}
    bare = get_plugin_manager(load_entrypoints=False, defaults=())
    r = error_for_exception(bare, "/api/v1/generate", ContextOverflowError("too long"))
    assert r.status_code == 400 and json.loads(r.body) == {"detail": "too long"}


def test_render_special_and_a_control_token_as_stop_sequence(client, demo_engine):
    # KoboldCpp 1.76: control tokens print nothing unless render_special; a stop sequence that is one such token
    # stops on it and counts as an end token ("stop").
    bos = demo_engine.tokenizer.bos_id
    piece = demo_engine.tokenizer.token_bytes(bos, special=True).decode()
    body = {"prompt": "x", "max_length": 3, "logit_bias": {str(bos): 100}}
    assert client.post("/api/v1/generate", json=body).json() == {"results": [{"text": "", "finish_reason": "length"}]}
    r = client.post("/api/v1/generate", json=dict(body, render_special=True)).json()
    assert piece and r["results"][0]["text"] == piece * 3
    r = client.post("/api/v1/generate", json=dict(body, stop_sequence=[piece])).json()
    assert r == {"results": [{"text": "", "finish_reason": "stop"}]}
    assert client.get("/api/extra/version").json()["embeddings"] is True
    # text-generation-webui's spelling of the same switch, on its route and the OpenAI one
    tgw = {"prompt": "x", "max_new_tokens": 3, "logit_bias": {str(bos): 100}}
    assert client.post("/api/v1/generate", json=tgw).json()["results"][0]["text"] == ""
    r = client.post("/api/v1/generate", json=dict(tgw, skip_special_tokens=False)).json()
    assert r["results"][0]["text"] == piece * 3
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logit_bias": {str(bos): 100},
                                             "skip_special_tokens": False}).json()
    assert r["choices"][0]["text"] == piece * 3


def test_real_model_answers_and_stops_on_its_text(real_app):
    """KoboldCpp clients send the prompt as written: the real model's greedy answer, and a stop string cut from
    its own text (the file's template written out by the client, special tokens and all)."""
    c = TestClient(real_app)
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    r = c.post("/api/v1/generate", json={"prompt": prompt, "max_length": 24, "temperature": 0,
                                         "rep_pen": 1.0}).json()["results"][0]
    assert "blue" in r["text"]
    base = {"prompt": "Once upon a time, in a small village", "max_length": 40, "temperature": 0, "rep_pen": 1.0}
    text = c.post("/api/v1/generate", json=base).json()["results"][0]["text"]
    i, stop = pick_stop(text)
    r = c.post("/api/v1/generate", json=dict(base, stop_sequence=[stop], trim_stop=True)).json()
    assert r["results"][0]["text"] == text[:i]


def test_bypass_eos_keeps_generating_past_the_end_token(client, demo_engine):
    # KoboldCpp 1.76 (gpttype_adapter.cpp): with bypass_eos the end token is not banned, even with
    # use_default_badwordsids, and sampling it ends nothing; it prints only with render_special (KoboldAI Lite's
    # "Bypass EOS" mode sends it).
    eos = demo_engine.tokenizer.eos_id
    piece = demo_engine.tokenizer.token_bytes(eos, special=True).decode()
    body = {"prompt": "x", "max_length": 3, "logit_bias": {str(eos): 100}}
    assert client.post("/api/v1/generate", json=body).json() == {"results": [{"text": "", "finish_reason": "stop"}]}
    for ban in (False, True):
        r = client.post("/api/v1/generate", json=dict(body, bypass_eos=True, use_default_badwordsids=ban)).json()
        assert r == {"results": [{"text": "", "finish_reason": "length"}]}
        r = client.post("/api/v1/generate", json=dict(body, bypass_eos=True, use_default_badwordsids=ban,
                                                       render_special=True)).json()
        assert piece and r["results"][0]["text"] == piece * 3
    banned = client.post("/api/v1/generate", json=dict(body, use_default_badwordsids=True)).json()["results"][0]
    assert banned["finish_reason"] == "length" and piece not in banned["text"]


def test_grammar_retain_state_goes_on_where_the_last_generation_stopped(client):
    # KoboldCpp 1.76 (gpttype_adapter.cpp gpttype_generate): with grammar_retain_state and the same grammar as the
    # last generation, the grammar is not reloaded, so a continuation goes on inside the structure
    target = "xyzzy plugh xyzzy"
    body = {"prompt": "Say it:", "max_length": 2, "grammar": f'root ::= "{target}"', "temperature": 0.0}
    first = client.post("/api/v1/generate", json=body).json()["results"][0]
    assert first["finish_reason"] == "length" and target.startswith(first["text"]) and first["text"] != target
    assert client.post("/api/v1/generate", json=body).json()["results"][0]["text"] == first["text"]   # reloaded
    client.post("/api/v1/generate", json={"prompt": "Say it:", "max_length": 2})       # no grammar: nothing kept
    assert client.post("/api/v1/generate", json=dict(body, grammar_retain_state=True)).json()[
        "results"][0]["text"] == first["text"]
    got, finish = first["text"], "length"
    for _ in range(len(target)):
        if finish != "length":
            break
        r = client.post("/api/v1/generate", json=dict(body, prompt="Say it:" + got,
                                                       grammar_retain_state=True)).json()["results"][0]
        got, finish = got + r["text"], r["finish_reason"]
    assert got == target and finish == "stop"


def test_perf_stop_reason_codes_are_koboldcpps():
    """KoboldCpp's codes (expose.h): -1 before any generation, 0 out of tokens, 1 EOS, 2 a stop sequence or an
    abort; the engine reports a FinishReason, the adapter owns the codes."""
    engine, _ = scripted_engine("abc")
    c = TestClient(make_app(engine))
    assert c.get("/api/extra/perf").json()["stop_reason"] == -1
    c.post("/api/v1/generate", json={"prompt": "x", "max_length": 2})
    assert c.get("/api/extra/perf").json()["stop_reason"] == 0
    c.post("/api/v1/generate", json={"prompt": "x", "max_length": 10})
    assert c.get("/api/extra/perf").json()["stop_reason"] == 1
    c.post("/api/v1/generate", json={"prompt": "x", "max_length": 10, "stop_sequence": ["b"]})
    assert c.get("/api/extra/perf").json()["stop_reason"] == 2


def test_perf_is_koboldcpps_shape_of_the_engines_facts():
    """The engine reports neutral facts (idle a bool, nothing of image generation or the horde); the adapter gives
    KoboldCpp 1.76's fields in its order, idle as 0/1, and the facts KoboldCpp added later after them."""
    engine, _ = scripted_engine("abc")
    facts = engine.perf()
    assert facts["idle"] is True and not {"total_img_gens", "hordeexitcounter", "quiet"} & set(facts)
    c = TestClient(make_app(engine, quiet=True))
    c.post("/api/v1/generate", json={"prompt": "x", "max_length": 2})
    raw = c.get("/api/extra/perf").text
    perf = json.loads(raw)
    assert list(perf)[:13] == ["last_process", "last_eval", "last_token_count", "last_seed", "total_gens",
                               "stop_reason", "total_img_gens", "queue", "idle", "hordeexitcounter", "uptime",
                               "idletime", "quiet"]
    assert '"idle":1' in raw.replace(" ", "") and perf["quiet"] is True and perf["total_img_gens"] == 0
    assert perf["last_token_count"] == 2 and perf["total_gens"] == 1 and perf["last_input_count"] == 2
