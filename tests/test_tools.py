"""Tool calling in the core (airobackend.tools): the prompt as llama.cpp's generic format writes it, the answer's
grammar, the streaming reader, and the Python API (Llama.create_chat_completion with tools / response_format)."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from airobackend.chat import get_template
from airobackend.errors import RequestError
from airobackend.grammar import Grammar
from airobackend.tools import INSTRUCTION, TOOLS_PREAMBLE, ToolCallStream, parse_tools

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def test_prompt_writes_tools_calls_and_results_as_llama_cpp_generic_format():
    spec = parse_tools([ADD], "auto")
    history = [{"role": "user", "content": "2+3?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    t = get_template("airoboros")
    prompt = t.format(spec.prepare(history, t.system), tools=spec.tools)
    # the default preamble is kept; the instruction, then the tools (minja's polyfill order) follow it
    system = t.system + "\n\n" + INSTRUCTION + "\n\n" + TOOLS_PREAMBLE + json.dumps([ADD], indent=2)
    call = json.dumps({"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "call_1"}]}, indent=2)
    result = json.dumps({"tool_response": {"content": "5", "tool_call_id": "call_1"}}, indent=2)
    assert prompt == f"{system} USER: 2+3? ASSISTANT: {call}</s>USER: {result} ASSISTANT:"
    # a system message of the caller's gets the texts appended instead; tool_choice none adds no instruction
    p2 = t.format(parse_tools([ADD], "none").prepare([{"role": "system", "content": "Be brief."}, *history[:1]]),
                  tools=[ADD])
    assert p2.startswith("Be brief.\n\n" + TOOLS_PREAMBLE) and INSTRUCTION not in p2


def test_grammar_shapes_follow_tool_choice():
    def accepts(grammar: str, text: str) -> bool:
        g = Grammar.parse(grammar)
        stacks = g.initial_stacks
        for ch in text:
            stacks = g.accept_char(stacks, ord(ch))
        return () in stacks

    other = {"type": "function", "function": {"name": "noop"}}
    call = '{"tool_call": {"name": "add", "arguments": {"a": 1, "b": -2}}}'
    reply = '{"response": "fine"}'
    auto = parse_tools([ADD, other]).grammar()
    assert accepts(auto, call) and accepts(auto, reply) and accepts(auto, '{"tool_call": {"name": "noop", '
                                                                           '"arguments": {}}}')
    assert not accepts(auto, '{"tool_call": {"name": "add", "arguments": {"a": 1}}}')      # b is required
    required = parse_tools([ADD, other], "required").grammar()
    assert accepts(required, call) and not accepts(required, reply)
    named = parse_tools([ADD, other], {"type": "function", "function": {"name": "noop"}}).grammar()
    assert not accepts(named, call) and accepts(named, '{"tool_call": {"name": "noop", "arguments": {}}}')
    parallel = parse_tools([ADD], "required", True).grammar()
    assert accepts(parallel, '{"tool_calls": [' + call[14:-1] + ", " + call[14:-1] + "]}")
    assert not accepts(parallel, '{"tool_calls": []}')
    with_schema = parse_tools([ADD]).grammar({"type": "object", "properties": {"n": {"type": "integer"}},
                                              "required": ["n"]})
    assert accepts(with_schema, '{"response": {"n": 4}}') and not accepts(with_schema, reply)


@pytest.mark.parametrize("text", [
    '{"tool_call": {"name": "add", "arguments": {"a": 12, "b": -3}}}',
    '{ "tool_call" :\n {"name" : "add" , "arguments" : { "b" : 0 ,\n\t"a": 7 } } } ',
    '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3, "b": 4}}]}',
])
def test_stream_reader_pieces_equal_the_whole(text):
    spec = parse_tools([ADD], parallel_tool_calls=text.startswith('{"tool_calls"'))
    whole = ToolCallStream(spec)
    whole.feed(text)
    content, calls = whole.message()
    assert content is None and calls and all(c["id"].startswith("call_") for c in calls)
    expected = json.loads(text)
    expected = expected.get("tool_calls") or [expected["tool_call"]]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(e["name"], e["arguments"]) for e in expected]
    assert all(" " not in c["function"]["arguments"] for c in calls)        # the model's JSON, spaces removed
    rng = np.random.default_rng(len(text))
    for _ in range(5):                          # any split into pieces gives the same deltas joined
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=6, replace=False))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        ts = ToolCallStream(spec)
        deltas = [d for p in pieces for d in ts.feed(p)]
        heads = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
        assert [h["function"]["name"] for h in heads] == [c["function"]["name"] for c in calls]
        for k, call in enumerate(calls):
            args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas
                           if d["tool_calls"][0]["index"] == k and "id" not in d["tool_calls"][0])
            assert args == call["function"]["arguments"]


def test_stream_reader_on_a_reply_and_on_a_cut_answer():
    spec = parse_tools([ADD])
    ts = ToolCallStream(spec)
    out = [d for ch in '{"response": "tab\\tquote\\" \\u00e9 \\\\"}' for d in ts.feed(ch)]
    assert "".join(d["content"] for d in out) == 'tab\tquote" é \\' and ts.message() == ('tab\tquote" é \\', [])
    cut = '{"tool_call": {"name": "add", "arguments": {"a": 1'
    ts = ToolCallStream(spec)
    ts.feed(cut)
    assert not ts.complete and ts.message() == (cut, [])       # max_tokens cut it: the raw text, no call


@pytest.mark.parametrize("tools, choice, param", [
    ("add", None, "tools"), ([ADD], "maybe", "tool_choice"), ([ADD], {"function": {"name": "sub"}}, "tool_choice"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools"), (None, "required", "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
])
def test_bad_tools_are_refused_by_field(tools, choice, param):
    with pytest.raises(RequestError) as e:
        parse_tools(tools, choice)
    assert e.value.param == param


# ---------------------------------------------------------------------------------------------- Python API

@pytest.fixture(scope="module")
def llm(demo_model):
    from airobackend.llama import Llama
    m = Llama(str(demo_model), n_ctx=2048, n_threads=2, verbose=False)
    yield m
    m.close()


def test_python_api_response_format_and_tool_calls(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
              "required": ["ok", "n"]}
    r = llm.create_chat_completion([{"role": "user", "content": "JSON"}], max_tokens=200, seed=1,
                                   response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)

    msgs = [{"role": "user", "content": "Add 2 and 3"}]
    r = llm.create_chat_completion(msgs, tools=[ADD], tool_choice="required", max_tokens=300, seed=2)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD["function"]["parameters"])
    chunks = list(llm.create_chat_completion(msgs, tools=[ADD], tool_choice="required", max_tokens=300, seed=2,
                                             stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[1]["tool_calls"][0]["function"]["name"] == "add"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:] if d.get("tool_calls")) == \
        call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the older functions / function_call spelling
    r = llm.create_chat_completion(msgs, functions=[ADD["function"]], function_call={"name": "add"},
                                   max_tokens=300, seed=3)
    assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
    with pytest.raises(RequestError):
        llm.create_chat_completion(msgs, tools=[ADD], grammar='root ::= "x"')


def test_python_api_refuses_by_field_and_keeps_working(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    for kw, param in ((dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "sub"}}), "tool_choice"),
                      (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"not": {}}}}),
                       "response_format"),
                      (dict(dry_sequence_breakers=["x"] * 10_000), "dry_sequence_breakers"),
                      (dict(xtc_probability="often"), "xtc_probability")):
        with pytest.raises(RequestError) as e:
            llm.create_chat_completion(msgs, max_tokens=2, **kw)
        assert getattr(e.value, "param", None) == param or param in str(e.value), (param, e.value)
    assert llm.create_chat_completion(msgs, max_tokens=2, seed=1)["usage"]["completion_tokens"] == 2
