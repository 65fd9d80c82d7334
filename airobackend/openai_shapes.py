"""OpenAI's completion and chat answers as dicts: the one place that knows their shape.

Two callers build them from the engine's `GenerationEvent`s: `airobackend.llama.Llama` (llama-cpp-python's
`create_completion` / `create_chat_completion`, which return these dicts) and the OpenAI adapter (which sends them
as JSON, adding llama.cpp's `timings`). Keys come in the order OpenAI's API sends them, so that the HTTP bodies are
the same byte for byte whichever caller builds them.

A stream is built choice by choice: `CompletionDeltas` and `ChatDeltas` turn each event into the choice objects
of its chunks (after `first()`, the opening one, if any), and `Envelope.chunk` wraps one in the fields every chunk
repeats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from airobackend.tools import ToolCallStream, ToolSpec
from airobackend.types import FinishReason, GenerationEvent


def finish_reason(ev: Optional[GenerationEvent], tool_stream: Optional[ToolCallStream] = None) -> Optional[str]:
    """OpenAI's finish_reason: EOS, stop strings and aborts are "stop", the token limit "length", a parsed tool call
    "tool_calls"; None before the last event."""
    if ev is None or ev.finish_reason is None:
        return None
    if tool_stream is not None and tool_stream.complete and tool_stream.calls:
        return "tool_calls"
    return "length" if ev.finish_reason == FinishReason.LENGTH else "stop"


def usage(ev: Optional[GenerationEvent]) -> dict:
    """OpenAI usage, with the prompt tokens reused from the KV cache as `prompt_tokens_details.cached_tokens`."""
    return usage_of([ev] if ev is not None else [])


def usage_of(finals: list[GenerationEvent], n: int = 1) -> dict:
    """Usage of an answer whose choices come `n` per prompt: each prompt counted once, every completion."""
    per_prompt = finals[::max(1, n)]
    p = sum(int(e.prompt_tokens) for e in per_prompt)
    c = sum(int(e.completion_tokens) for e in finals)
    cached = sum(int(e.cached_tokens) for e in per_prompt)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The engine's per-token logprobs in /v1/completions' legacy shape; `offset` is the first token's place in
    the choice's text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e.get("top_logprobs", [])})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


def chat_logprobs(entries: list[dict], top: Optional[int] = None) -> dict:
    """The engine's per-token logprobs in the chat shape, with at most `top` alternatives each (`top_logprobs`)."""
    def item(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [dict(item(e), top_logprobs=[item(t) for t in e.get("top_logprobs", [])[:top]])
                        for e in entries]}


def completion_choice(index: int, text: str, logprobs: Optional[dict], finish: Optional[str]) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, message: dict, logprobs: Optional[dict], finish: Optional[str]) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def delta_choice(index: int, delta: dict, logprobs: Optional[dict] = None, finish: Optional[str] = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


@dataclass
class Envelope:
    """What the answer and every chunk of one response repeat. `fingerprint`: carry OpenAI's `system_fingerprint`
    (null), as the HTTP API does; llama-cpp-python's dicts have none."""

    id: str
    object: str             # "text_completion", "chat.completion" or "chat.completion.chunk"
    created: int
    model: str
    fingerprint: bool = False

    def _head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def answer(self, choices: list[dict], usage: dict) -> dict:
        out = dict(self._head(), choices=choices, usage=usage)
        if self.fingerprint:
            out["system_fingerprint"] = None
        return out

    def chunk(self, choice: dict) -> dict:
        out = self._head()
        if self.fingerprint:
            out["system_fingerprint"] = None
        out["choices"] = [choice]
        return out

    def usage_chunk(self, usage: dict) -> dict:
        """The chunk after the last choice when the client asked for usage (`stream_options.include_usage`)."""
        return dict(self._head(), choices=[], usage=usage)


class CompletionDeltas:
    """The text_completion chunk choices of one streamed choice: one per text delta, the last with finish_reason."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.offset = 0         # where the next delta starts in the choice's text (logprobs' text_offset)

    def first(self) -> None:
        """A completion stream has no opening chunk (a chat stream's names the role)."""
        return None

    def feed(self, ev: GenerationEvent) -> list[dict]:
        if not ev.text and ev.finish_reason is None:
            return []
        lp = completion_logprobs(ev.logprobs, self.offset) if ev.logprobs else None
        self.offset += len(ev.text)
        return [completion_choice(self.index, ev.text, lp, finish_reason(ev))]


class ChatDeltas:
    """The chat.completion.chunk choices of one streamed choice: `first()` the role, then content deltas, then an
    empty delta with finish_reason.

    With `tools` the answer's JSON is read as it grows: a `response` streams as content, a call as OpenAI streams
    one (a delta with the call's index, id and name, then deltas with pieces of its arguments); text that is not the
    expected JSON comes once at the end, as content. `role_delta`: the first delta (llama-cpp-python sends only the
    role). `lstrip`: drop the reply's leading white space (a template ending in "ASSISTANT:" leaves a space)."""

    def __init__(self, index: int = 0, tools: Optional[ToolSpec] = None, top: Optional[int] = None, *,
                 role_delta: Optional[dict] = None, lstrip: bool = False) -> None:
        self.index, self.top, self.lstrip = index, top, lstrip
        self.tools = ToolCallStream(tools) if tools is not None else None
        self.role_delta = role_delta if role_delta is not None else \
            {"role": "assistant", "content": None if self.tools is not None else ""}
        self.sent = False       # a delta with content or a call went out

    def first(self) -> dict:
        """The opening chunk's choice: the role."""
        return delta_choice(self.index, dict(self.role_delta))

    def feed(self, ev: GenerationEvent) -> list[dict]:
        ts = self.tools
        if ts is None:
            text = ev.text.lstrip() if self.lstrip and not self.sent else ev.text
            deltas = [{"content": text}] if text else []
        else:
            deltas = ts.feed(ev.text)
            if ev.finish_reason is not None and not self.sent and not deltas and not ts.complete:
                deltas = [{"content": "".join(ts.text)}]            # not the expected JSON: the raw text, once
        out = []
        for k, delta in enumerate(deltas):
            self.sent = True
            lp = chat_logprobs(ev.logprobs, self.top) if k == 0 and ev.logprobs else None
            out.append(delta_choice(self.index, delta, lp))
        if ev.finish_reason is not None:
            out.append(delta_choice(self.index, {}, None, finish_reason(ev, ts)))
        return out
