"""airobackend.openai_shapes: the OpenAI answer and chunk dicts that Llama and the OpenAI adapter both send."""
from __future__ import annotations

import json

from airobackend.openai_shapes import (ChatDeltas, CompletionDeltas, Envelope, finish_reason, usage, usage_of)
from airobackend.tools import parse_tools
from airobackend.types import FinishReason, GenerationEvent

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def final(text: str = "", reason: FinishReason = FinishReason.EOS, p: int = 5, c: int = 3, cached: int = 2):
    return GenerationEvent(text=text, finish_reason=reason, prompt_tokens=p, completion_tokens=c, cached_tokens=cached)


def test_envelope_keys_in_openais_order():
    env = Envelope("chatcmpl-1", "chat.completion.chunk", 7, "m", fingerprint=True)
    assert list(env.chunk({})) == ["id", "object", "created", "model", "system_fingerprint", "choices"]
    assert list(env.answer([], {})) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert "system_fingerprint" not in Envelope("x", "text_completion", 7, "m").answer([], {})


def test_finish_reasons_and_usage():
    assert [finish_reason(final(reason=r)) for r in FinishReason] == ["stop", "stop", "length", "stop"]
    assert finish_reason(GenerationEvent(text="a")) is None and finish_reason(None) is None
    assert usage(final()) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                              "prompt_tokens_details": {"cached_tokens": 2}}
    # two prompts with two choices each: each prompt counted once, every completion
    u = usage_of([final(p=5), final(p=5), final(p=9, cached=0), final(p=9, cached=0)], n=2)
    assert (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]) == (14, 12, 2)


def test_completion_deltas_offsets_and_skipped_empty_events():
    d = CompletionDeltas(index=1)
    lp = [{"token": "ab", "logprob": -0.5, "top_logprobs": [{"token": "ab", "logprob": -0.5}]}]
    assert d.first() is None and d.feed(GenerationEvent(text="")) == []
    first = d.feed(GenerationEvent(text="ab", logprobs=lp))[0]
    second = d.feed(GenerationEvent(text="cd", logprobs=[dict(lp[0], token="cd")]))[0]
    assert first["index"] == 1 and first["logprobs"]["text_offset"] == [0]
    assert second["logprobs"]["text_offset"] == [2] and second["finish_reason"] is None
    assert d.feed(final(reason=FinishReason.LENGTH))[0]["finish_reason"] == "length"


def test_chat_deltas_strip_the_leading_space_only_when_asked():
    events = [GenerationEvent(text=" "), GenerationEvent(text=" Hi"), final(" there")]
    for lstrip, want in ((True, "Hi there"), (False, "  Hi there")):
        d = ChatDeltas(lstrip=lstrip)
        chunks = [c for ev in events for c in d.feed(ev)]
        assert "".join(c["delta"].get("content", "") for c in chunks) == want
        assert chunks[-1]["delta"] == {} and chunks[-1]["finish_reason"] == "stop"
    assert ChatDeltas().first()["delta"] == {"role": "assistant", "content": ""}
    assert ChatDeltas(role_delta={"role": "assistant"}).first()["delta"] == {"role": "assistant"}


def test_chat_deltas_stream_a_tool_call_and_end_with_tool_calls():
    spec = parse_tools(TOOLS, "auto", None)
    answer = json.dumps({"tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]})
    d = ChatDeltas(tools=spec)
    pieces = [answer[i:i + 5] for i in range(0, len(answer), 5)]
    chunks = [c for p in pieces[:-1] for c in d.feed(GenerationEvent(text=p))] + d.feed(final(pieces[-1]))
    calls = [c["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["delta"]]
    assert calls[0]["function"]["name"] == "weather"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["finish_reason"] == "tool_calls"


def test_chat_deltas_give_text_that_is_no_tool_json_once_as_content():
    d = ChatDeltas(tools=parse_tools(TOOLS, "auto", None))
    chunks = d.feed(GenerationEvent(text="just ")) + d.feed(final("words"))
    assert [c["delta"] for c in chunks] == [{"content": "just words"}, {}]
    assert chunks[-1]["finish_reason"] == "stop"
