"""A generation that fails after a stream's headers went out (no status can say so any more): one loop,
`aio.live_events`, reads every streaming route's events; it logs the failure once and each protocol ends its stream
in the way its clients understand. The server keeps serving afterwards."""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing

import pytest
from starlette.testclient import TestClient

from fakes import ByteTokenizer, FakeLlama, ScriptedModel, make_app

from airobackend.aio import FAILED, GenerationStream, live_events
from airobackend.engine import Engine
from airobackend.settings import Settings
from airobackend.types import GenerationRequest

REPLY = "Hello there, friend"
LOGGED = "generation failed mid-stream"


class BreakingModel(ScriptedModel):
    """The scripted model, whose forward pass raises from its `fail_at`-th call on while `broken` is set (the
    first call evaluates the prompt, each later one a generated token)."""

    def __init__(self, fail_at: int, **kw) -> None:
        super().__init__(REPLY, **kw)
        self.fail_at, self.broken, self.calls = fail_at, True, 0

    def eval(self, tokens, n_past, logits_all=False):
        self.calls += 1
        if self.broken and self.calls >= self.fail_at:
            raise RuntimeError("the forward pass broke")
        return super().eval(tokens, n_past, logits_all)


def breaking_engine(fail_at: int = 4, **kw):
    model = BreakingModel(fail_at, **kw)
    return Engine(FakeLlama(model, ByteTokenizer()), Settings(n_ctx=512, template="airoboros")), model


def failure_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if LOGGED in r.getMessage()]


def test_live_events_gives_the_events_then_failed_once(caplog):
    engine, _ = breaking_engine(fail_at=4)

    async def read():
        gs = GenerationStream(engine, GenerationRequest(prompt="x", max_tokens=20))
        await gs.start()
        async with aclosing(live_events(gs)) as events:
            return [ev async for ev in events], gs

    with caplog.at_level(logging.ERROR, logger="airobackend.aio"):
        got, gs = asyncio.run(read())
    texts = [ev.text for ev in got if ev is not FAILED]
    assert got[-1] is FAILED and got.count(FAILED) == 1
    assert "".join(texts) and REPLY.startswith("".join(texts)) and len("".join(texts)) < len(REPLY)
    assert gs.finished and len(failure_logs(caplog)) == 1 and "the forward pass broke" in failure_logs(caplog)[0]


def test_live_events_closed_early_aborts_the_generation():
    """A reader that stops (the client left) closes the loop, and that aborts the generation at once."""
    engine, model = breaking_engine(fail_at=10**9, eos=False)

    async def read_one():
        gs = GenerationStream(engine, GenerationRequest(prompt="x", max_tokens=10_000))
        await gs.start()
        async with aclosing(live_events(gs)) as events:
            async for ev in events:
                if ev.text:
                    break
        return gs

    gs = asyncio.run(read_one())
    gs._thread.join(timeout=30)                        # the worker ends once the engine has stopped
    assert gs.cancelled and not gs._thread.is_alive() and model.calls < 100


def sse_data(raw: bytes) -> list:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 20, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}),
])
def test_openai_stream_ends_with_an_error_event_and_done(caplog, path, body):
    engine, model = breaking_engine(fail_at=4)
    client = TestClient(make_app(engine))
    with caplog.at_level(logging.ERROR):
        r = client.post(path, json=body)
    assert r.status_code == 200                         # the headers were out before the failure
    data = sse_data(r.content)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])
    assert error == {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
    assert all("choices" in json.loads(d) and json.loads(d)["choices"][0]["finish_reason"] is None
               for d in data[:-2])
    assert len(failure_logs(caplog)) == 1
    model.broken = False                                # the server keeps serving
    again = client.post(path, json=dict(body, stream=False))
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] == "stop"


def test_kobold_stream_ends_with_a_length_event(caplog):
    engine, model = breaking_engine(fail_at=4)
    client = TestClient(make_app(engine))
    with caplog.at_level(logging.ERROR):
        r = client.post("/api/extra/generate/stream", json={"prompt": "x", "max_length": 20})
    assert r.status_code == 200
    events = [json.loads(d) for d in sse_data(r.content)]
    assert all(e["finish_reason"] == "null" and e["token"] for e in events[:-1]) and len(events) > 1
    assert events[-1] == {"token": "", "finish_reason": "length"}
    assert len(failure_logs(caplog)) == 1
    model.broken = False
    assert client.post("/api/v1/generate", json={"prompt": "x", "max_length": 5}).json()["results"][0]["text"]


def test_openai_answer_that_fails_is_a_500_with_the_reason():
    """Without a stream the status can still say it: the engine's error, as the error_response hook shapes it."""
    engine, _ = breaking_engine(fail_at=4)
    r = TestClient(make_app(engine), raise_server_exceptions=False).post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 20})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
