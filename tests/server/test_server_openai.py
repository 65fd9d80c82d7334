"""OpenAI-compatible routes with the real `openai` SDK over a socket, exact SSE framing, the error envelope, and
text-generation-webui's /v1/internal routes that SillyTavern's Text Completion mode calls."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from fakes import live, make_app, pick_stop, scripted_engine


@pytest.fixture
def client(demo_app):
    return TestClient(demo_app)


def openai_events(raw: bytes) -> list[dict]:
    """Parse an OpenAI stream strictly: `data: <json>\\n\\n` events, LF only, ending with a terminated [DONE]."""
    assert b"\r" not in raw
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    chunks = raw[:-len(b"data: [DONE]\n\n")].split(b"\n\n")
    assert chunks[-1] == b""
    out = []
    for c in chunks[:-1]:
        assert c.startswith(b"data: ") and b"\n" not in c
        out.append(json.loads(c[6:]))
    return out


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_openai_sdk_completions_chat_and_streams(demo_app, demo_engine):
    name = demo_engine.model_info()["name"]
    with live(demo_app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        models = client.models.list()
        assert [m.id for m in models.data] == [name]
        assert models.data[0].owned_by and isinstance(models.data[0].created, int)

        prompt = "Once upon a time there was a llama"
        c = client.completions.create(model=name, prompt=prompt, max_tokens=9, seed=11, temperature=0.9)
        assert c.object == "text_completion" and c.model == name
        assert c.choices[0].finish_reason == "length"
        assert c.usage.completion_tokens == 9
        assert c.usage.prompt_tokens == len(demo_engine.tokenize(prompt))
        assert c.usage.total_tokens == c.usage.prompt_tokens + 9

        chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=9, seed=11, temperature=0.9,
                                                stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])

        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}]
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=7, seed=3)
        assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].finish_reason in ("length", "stop")
        assert chat.usage.prompt_tokens == len(demo_engine.tokenize(demo_engine.format_chat(messages)))
        deltas = list(client.chat.completions.create(model=name, messages=messages, max_tokens=7, seed=3,
                                                     stream=True, stream_options={"include_usage": True}))
        assert deltas[0].choices[0].delta.role == "assistant"
        assert "".join(d.choices[0].delta.content or "" for d in deltas if d.choices) == \
            chat.choices[0].message.content
        assert deltas[-1].usage.completion_tokens == chat.usage.completion_tokens

        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=name, prompt="x", max_tokens=-5)
        assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_sse_framing_is_exact_and_terminated(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "stream": True, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = openai_events(r.content)
    assert {e["object"] for e in events} == {"text_completion"} and len({e["id"] for e in events}) == 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                  "stream": True})
    events = openai_events(r.content)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert {e["object"] for e in events} == {"chat.completion.chunk"}


def test_logit_bias_forces_a_token(client, demo_engine):
    tid = demo_engine.tokenize("llama", add_bos=False)[0]
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "logit_bias": {str(tid): 100},
                                             "temperature": 1.0}).json()
    assert r["choices"][0]["text"] == demo_engine.detokenize([tid] * 6)


def test_n_choices_and_token_prompts(client, demo_engine):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "n": 2, "seed": 4}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["completion_tokens"] == 6
    ids = demo_engine.tokenize("Hello")
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "seed": 4}).json()
    assert by_ids["choices"][0]["text"] == r["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_stop_strings_and_finish_reason_stop(client, demo_engine):
    base = {"prompt": "The old llama said", "max_tokens": 40, "seed": 9, "ignore_eos": True}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    i, stop = pick_stop(text)
    r = client.post("/v1/completions", json=dict(base, stop=stop)).json()
    assert r["choices"][0] == {"index": 0, "text": text[:i], "logprobs": None, "finish_reason": "stop"}
    events = openai_events(client.post("/v1/completions", json=dict(base, stop=[stop], stream=True)).content)
    assert "".join(e["choices"][0]["text"] for e in events) == text[:i]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    eos = {str(demo_engine.tokenizer.eos_id): 100}              # EOS is a "stop" too
    r = client.post("/v1/completions", json={"prompt": "x", "logit_bias": eos}).json()
    assert r["choices"][0]["text"] == "" and r["choices"][0]["finish_reason"] == "stop"


def test_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "lots"}, "max_tokens"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 50}, "n"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
])
def test_bad_requests_get_the_openai_error_envelope(client, route, body, param):
    for stream in (False, True):
        r = client.post(route, json=dict(body, stream=stream))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == param
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_malformed_json_nan_and_unknown_route(client):
    for raw in (b"{not json", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}', b"\xff\xfe"):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_internal_routes_used_by_sillytavern(client, demo_engine):
    text = "The llama spoke."
    enc = client.post("/v1/internal/encode", json={"text": text}).json()
    assert enc == {"tokens": demo_engine.tokenize(text), "length": len(demo_engine.tokenize(text))}
    dec = client.post("/v1/internal/decode", json={"tokens": enc["tokens"][1:]}).json()
    assert dec["text"].lstrip() == text
    assert client.post("/v1/internal/token-count", json={"text": text}).json() == {"length": enc["length"]}
    info = client.get("/v1/internal/model/info").json()
    assert info["model_name"] == demo_engine.model_info()["name"] and info["lora_names"] == []
    assert client.post("/v1/internal/stop-generation").json() == "OK"
    assert client.get(f"/v1/models/{info['model_name']}").json()["id"] == info["model_name"]
    assert client.get("/v1/models/gpt-4").status_code == 404


def test_sillytavern_text_completion_body_is_accepted(client):
    """SillyTavern forwards its whole settings object to /v1/completions (SillyTavern 1.12.6,
    `src/endpoints/backends/text-completions.js`)."""
    body = {"prompt": "Hello", "model": "x", "max_new_tokens": 4, "max_tokens": 4, "temperature": 0.7, "top_p": 0.9,
            "typical_p": 1, "typical": 1, "sampler_seed": 5, "min_p": 0.05, "repetition_penalty": 1.1,
            "frequency_penalty": 0, "presence_penalty": 0, "top_k": 40, "skew": 0, "min_tokens": 0,
            "add_bos_token": True, "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2,
            "dry_multiplier": 0, "dry_base": 1.75, "dry_sequence_breakers": "[\"\\n\", \":\"]",
            "dry_penalty_last_n": 0, "max_tokens_second": 0, "stopping_strings": ["\nYou:"], "stop": ["\nYou:"],
            "truncation_length": 4096, "ban_eos_token": False, "skip_special_tokens": True, "top_a": 0, "tfs": 1,
            "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "",
            "banned_strings": [], "api_type": "koboldcpp", "api_server": "http://127.0.0.1:5001",
            "legacy_api": False, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "xtc_threshold": 0.1,
            "xtc_probability": 0, "grammar": "", "rep_pen": 1.1, "rep_pen_range": 0, "seed": 5,
            "guidance_scale": 1, "negative_prompt": "", "grammar_string": "", "repeat_penalty": 1.1, "tfs_z": 1,
            "repeat_last_n": 0, "n_predict": 4, "num_predict": 4, "num_ctx": 4096, "mirostat": 0,
            "ignore_eos": False, "rep_pen_slope": 1, "stream": False}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_lollms_vllm_binding_reads_models_and_streams(demo_app):
    """LoLLMS' vLLM binding: /v1/models entries need id, owned_by and an int created; streams read `data:` lines."""
    with live(demo_app) as srv:
        entry = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert isinstance(entry["created"], int) and entry["owned_by"] and entry["id"]
        text = ""
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={"model": entry["id"], "prompt": "Hi", "max_tokens": 5, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_keepalive_comments_while_the_engine_is_slow(monkeypatch):
    """During a long prompt evaluation the headers are already out and SSE comments keep the stream alive; the
    openai SDK skips them."""
    import airobackend.adapters.openai as oa

    monkeypatch.setattr(oa, "KEEPALIVE_S", 0.02)
    engine, _ = scripted_engine("slow reply", delay=0.06)
    with live(make_app(engine)) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={"prompt": "x", "max_tokens": 4, "stream": True}) as r:
            raw = r.read()
        assert b": keep-alive\n\n" in raw and raw.endswith(b"data: [DONE]\n\n")
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in raw.decode().split("\n\n")
                 if line.startswith("data: {")]
        assert "".join(texts) == "slow"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=4, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "slow"


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_real_model_chat_through_its_own_template(real_app, real_engine):
    """The real model's chat goes through the ChatML template of its file: the answer, and stop strings on its real
    text, with the openai SDK."""
    assert real_engine.model_info()["template"] == "gguf"
    with live(real_app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        question = [{"role": "user", "content": "What color is the sky?"}]
        out = client.chat.completions.create(model="x", messages=question, max_tokens=24, temperature=0)
        assert "blue" in out.choices[0].message.content
        prompt = real_engine.format_chat(question)
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert out.usage.prompt_tokens == len(real_engine.tokenize(prompt))      # <|im_start|> is one token
        base = dict(model="x", prompt="The history of Rome began", max_tokens=32, temperature=0, seed=1)
        text = client.completions.create(**base).choices[0].text
        i, stop = pick_stop(text)
        stopped = client.completions.create(**base, stop=[stop]).choices[0]
        assert stopped.text == text[:i] and stopped.finish_reason == "stop"


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_real_model_calls_a_tool_its_template_cannot_describe(real_app, real_engine):
    """SmolLM2's ChatML template has no tool syntax: the tools, the model's call and the tool's result reach it as
    JSON text in its turns (llama.cpp's polyfills), and its call takes the city from the question."""
    from airobackend.tools import TOOLS_PREAMBLE
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    prompt = real_engine.format_chat(question, tools=[weather])
    assert prompt.startswith("<|im_start|>system\n" + TOOLS_PREAMBLE) and '"name": "get_weather"' in prompt
    with live(real_app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        out = client.chat.completions.create(model="x", messages=question, tools=[weather], tool_choice="required",
                                             max_tokens=60, temperature=0)
        (call,) = out.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
        history = question + [out.choices[0].message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
        again = client.chat.completions.create(model="x", messages=history, tools=[weather], tool_choice="none",
                                               max_tokens=8, temperature=0)
        prompt = real_engine.format_chat(history, tools=[weather])
        assert again.usage.prompt_tokens == len(real_engine.tokenize(prompt))
        turns = prompt.split("<|im_start|>")
        assert json.loads(turns[-3].split("\n", 1)[1].split("<|im_end|>")[0])["tool_calls"][0]["arguments"] == \
            json.loads(call.function.arguments)
        assert json.loads(turns[-2].split("\n", 1)[1].split("<|im_end|>")[0]) == \
            {"tool_response": {"content": "18 C, sunny", "tool_call_id": call.id}}


def test_a_template_that_fails_is_a_400_naming_it():
    """A file's template that refuses the conversation (its own raise_exception, as Mistral's and LLaMA-2's do for
    turns that do not alternate) is the request's error, a 400 that names the template; the server keeps serving."""
    from airobackend.chat import JinjaTemplate
    engine, _ = scripted_engine("fine")
    engine._template = JinjaTemplate(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}{% endfor %}")
    c = TestClient(make_app(engine))
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    r = c.post("/v1/chat/completions", json={"messages": twice, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert "chat template (gguf)" in r.json()["error"]["message"] and "must alternate" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"messages": twice[:1], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
