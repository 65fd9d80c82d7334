"""Structured output and tool calling through the protocols: OpenAI `response_format` / llama.cpp's `json_schema`,
`tools` + `tool_choice` (answers, streams, tool results in later turns), KoboldCpp's /api/extra/json_to_grammar, and
their refusals. On the demo model (random weights) the grammar alone makes the output valid, so every answer is
checked with the `jsonschema` package; the scripted model shows the exact call shapes."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from starlette.testclient import TestClient

from airobackend.grammar import Grammar
from fakes import demo_manager, live, make_app, scripted_engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "hourly": {"type": "boolean"}},
        "required": ["unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                                       "required": ["zone"]}}}
ORDER = {"type": "object", "properties": {
    "paid": {"type": "boolean"},
    "qty": {"type": "integer", "minimum": 0, "maximum": 99},
    "when": {"type": "string", "format": "date"},
    "tags": {"type": "array", "items": {"enum": ["new", "gift"]}, "maxItems": 2}},
    "required": ["paid", "qty", "when"], "additionalProperties": False}


@pytest.fixture(scope="module")
def big_engine(demo_model):
    """The demo model with room for the tool preamble and a JSON answer."""
    return demo_manager(demo_model, 2048)


@pytest.fixture(scope="module")
def big_app(big_engine):
    return make_app(big_engine, n_ctx=2048, multiuser=4)


def args_schema(tool: dict) -> dict:
    return tool["function"]["parameters"]


def quote_bias(engine) -> dict[str, float]:
    """Logit bias that makes the random model close strings and objects soon (for schemas with free text)."""
    tok = engine.tokenizer
    return {str(t): 8.0 for t in range(tok.n_vocab) if b'"' in tok.token_bytes(t) or b"}" in tok.token_bytes(t)}


def test_response_format_json_schema_and_json_object_validate(big_app, big_engine):
    c = TestClient(big_app)
    rf = {"type": "json_schema", "json_schema": {"name": "order", "strict": True, "schema": ORDER}}
    for seed in (1, 2, 3):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "An order, please"}],
                                                 "max_tokens": 300, "seed": seed, "response_format": rf})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), ORDER)
    # the completions route and llama.cpp's top-level `json_schema` field, streamed
    r = c.post("/v1/completions", json={"prompt": "Order:", "max_tokens": 300, "seed": 4, "json_schema": ORDER,
                                        "stream": True})
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.split("\n\n")
                   if line.startswith("data: {"))
    jsonschema.validate(json.loads(text), ORDER)
    # json_object: any object (free strings closed soon by a bias on quote tokens)
    for seed in (5, 6):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "JSON!"}],
                                                 "max_tokens": 400, "seed": seed,
                                                 "response_format": {"type": "json_object"},
                                                 "logit_bias": quote_bias(big_engine)})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_openai_sdk_parse_with_a_pydantic_model(big_app):
    class Item(pydantic.BaseModel):
        qty: int = pydantic.Field(ge=1, le=9)
        color: Literal["red", "green"]

    class Order(pydantic.BaseModel):
        paid: bool
        items: list[Item] = pydantic.Field(max_length=2)

    with live(big_app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.parse(model="any", messages=[{"role": "user", "content": "order"}],
                                          response_format=Order, max_tokens=300, seed=7)
        order = r.choices[0].message.parsed
        assert isinstance(order, Order) and all(1 <= it.qty <= 9 for it in order.items)


@pytest.mark.e2e       # a uvicorn server on a loopback port
def test_tool_call_round_trip_through_the_openai_sdk(big_app, big_engine):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with live(big_app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="any", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=300, seed=3)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        tool = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(call.function.arguments), args_schema(tool))

        # streamed: the SDK's own accumulator rebuilds the same call from the deltas
        with client.chat.completions.stream(model="any", messages=messages, tools=[WEATHER, TIME],
                                            tool_choice="required", max_tokens=300, seed=3) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        scall = final.choices[0].message.tool_calls[0]
        assert final.choices[0].finish_reason == "tool_calls"
        assert (scall.function.name, scall.function.arguments) == (call.function.name, call.function.arguments)

        # a named function, and the tool's result sent back: the next answer is generated after it
        r2 = client.chat.completions.create(model="any", messages=messages, tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            max_tokens=300, seed=4)
        (tcall,) = r2.choices[0].message.tool_calls
        assert tcall.function.name == "get_time"
        jsonschema.validate(json.loads(tcall.function.arguments), args_schema(TIME))
        history = messages + [r2.choices[0].message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": tcall.id, "content": "12:00 UTC"}]
        r3 = client.chat.completions.create(model="any", messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=5, seed=5)
        assert r3.choices[0].message.tool_calls is None and r3.choices[0].finish_reason in ("length", "stop")
        prompt = big_engine.format_chat(history, tools=[WEATHER, TIME])
        assert r3.usage.prompt_tokens == len(big_engine.tokenize(prompt))
        assert '"tool_call_id": "' + tcall.id + '"' in prompt and "12:00 UTC" in prompt


def test_auto_tool_choice_answers_with_a_call_or_a_reply(big_app, big_engine):
    c = TestClient(big_app)
    seen = set()
    for seed in range(3):
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "max_tokens": 300, "seed": seed,
            "logit_bias": quote_bias(big_engine)})
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            seen.add("call")
            jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]),
                                args_schema(WEATHER))
        else:
            assert choice["finish_reason"] == "stop" and isinstance(choice["message"]["content"], str)
            assert "tool_calls" not in choice["message"]
            seen.add("reply")
    assert seen, "no answer ended"


SCRIPTED_CALL = '{"tool_call": {"name": "get_weather", "arguments": {"unit": "celsius", "days": 3}}}'


def test_scripted_call_exact_shapes_stream_and_not():
    engine, _ = scripted_engine(SCRIPTED_CALL, n_ctx=2048)
    c = TestClient(make_app(engine, n_ctx=2048))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "max_tokens": 200}
    r = c.post("/v1/chat/completions", json=body).json()
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"unit":"celsius","days":3}'}
    s = c.post("/v1/chat/completions", json=dict(body, stream=True))
    chunks = [json.loads(line[6:]) for line in s.text.split("\n\n") if line.startswith("data: {")]
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    head = deltas[1]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:] if d.get("tool_calls")]
    assert len(pieces) > 3 and "".join(pieces) == '{"unit":"celsius","days":3}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_every_choice_of_n_streams_its_own_call():
    engine, _ = scripted_engine(SCRIPTED_CALL, n_ctx=2048)
    c = TestClient(make_app(engine, n_ctx=2048))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "max_tokens": 200, "n": 3,
            "stream": True}
    chunks = [json.loads(line[6:]) for line in c.post("/v1/chat/completions", json=body).text.split("\n\n")
              if line.startswith("data: {")]
    heads, args, ends = {}, {0: "", 1: "", 2: ""}, {}
    for ch in chunks:
        (choice,) = ch["choices"]
        i = choice["index"]
        for call in choice["delta"].get("tool_calls") or ():
            assert call["index"] == 0
            if "id" in call:
                heads[i] = (call["id"], call["function"]["name"])
            args[i] += call["function"]["arguments"]
        if choice["finish_reason"]:
            ends[i] = choice["finish_reason"]
    assert ends == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    assert [name for _, name in heads.values()] == ["get_weather"] * 3 and len({cid for cid, _ in heads.values()}) == 3
    assert list(args.values()) == ['{"unit":"celsius","days":3}'] * 3


def test_scripted_parallel_calls_and_reply():
    calls = ('{"tool_calls": [{"name": "get_weather", "arguments": {"unit": "fahrenheit", "days": 1}}, '
             '{"name": "get_time", "arguments": {"zone": "utc"}}]}')
    engine, _ = scripted_engine(calls, n_ctx=2048)
    c = TestClient(make_app(engine, n_ctx=2048))
    body = {"messages": [{"role": "user", "content": "Both?"}], "tools": [WEATHER, TIME], "max_tokens": 300,
            "parallel_tool_calls": True}
    out = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["tool_calls"]
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in out] == \
        [("get_weather", {"unit": "fahrenheit", "days": 1}), ("get_time", {"zone": "utc"})]
    assert len({t["id"] for t in out}) == 2
    engine, _ = scripted_engine('{"response": "Sunny, \\"warm\\" \\u00e9t\\u00e9"}', n_ctx=2048)
    c = TestClient(make_app(engine, n_ctx=2048))
    r = c.post("/v1/chat/completions", json=dict(body, parallel_tool_calls=False)).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] == 'Sunny, "warm" été'
    s = c.post("/v1/chat/completions", json=dict(body, parallel_tool_calls=False, stream=True))
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in s.text.split("\n\n") if line.startswith("data: {"))
    assert text == 'Sunny, "warm" été'


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "function"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "uniqueItems": True}}}}}]}, "tools", "uniqueItems"),
    ({"tools": [WEATHER], "grammar": "root ::= \"x\""}, "grammar", "tools"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "number", "maximum": 2.5}}}},
     "response_format", "non-integer"),
    ({"response_format": {"type": "json_object"}, "json_schema": {"type": "object"}}, "json_schema", "not both"),
    ({"response_format": {"type": "json_object"}, "grammar": "root ::= \"x\""}, "grammar", "response_format"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}]}, "messages", "tool_calls"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "n": 10**6},
     "n", "<="),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(body, param, words):
    engine, _ = scripted_engine("ok")
    c = TestClient(make_app(engine))
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                             **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("body, param", [
    ({"json_schema": {"type": "number", "maximum": 2.5}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "https://x.test/s.json"}}}},
     "response_format"),
    ({"response_format": "json"}, "response_format"),
])
def test_a_schema_the_grammar_cannot_express_is_a_400_on_completions_too(body, param):
    engine, _ = scripted_engine("ok")
    c = TestClient(make_app(engine))
    for stream in (False, True):
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": stream, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).json()["choices"][0]["text"] == "ok"


def test_kobold_json_to_grammar():
    engine, _ = scripted_engine("ok")
    c = TestClient(make_app(engine))
    for body in ({"schema": ORDER}, ORDER):
        r = c.post("/api/extra/json_to_grammar", json=body)
        assert r.status_code == 200 and r.json()["success"] is True
        g = Grammar.parse(r.json()["result"])
        stacks = g.initial_stacks
        for ch in '{"paid": true, "qty": 12, "when": "2024-02-29", "tags": ["gift"]}':
            stacks = g.accept_char(stacks, ord(ch))
        assert () in stacks
    # the grammar works in a KoboldCpp generate request
    grammar = c.post("/api/extra/json_to_grammar", json={"schema": {"enum": ["yes", "no"]}}).json()["result"]
    engine2, _ = scripted_engine('"no"')
    c2 = TestClient(make_app(engine2))
    r = c2.post("/api/v1/generate", json={"prompt": "?", "max_length": 8, "grammar": grammar})
    assert r.json()["results"][0]["text"] == '"no"'
    bad = c.post("/api/extra/json_to_grammar", json={"schema": {"type": "string", "pattern": "^(?!x)$"}})
    assert bad.status_code == 400 and bad.json()["success"] is False and "lookaround" in bad.json()["detail"]["msg"]
