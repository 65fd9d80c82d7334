"""The disconnect log tells the truth: a stream read to its end logs nothing (uvicorn reports `http.disconnect`
after the last chunk of every response), a client that leaves mid-stream is logged once."""
from __future__ import annotations

import logging
import threading

import httpx
import pytest

from fakes import live, make_app, scripted_engine

pytestmark = pytest.mark.e2e       # a uvicorn server on a loopback port

CUT = "client disconnected mid-stream"


class Records(logging.Handler):
    """Collects airobackend.sse records; `cut` is set when a disconnect is logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.cut = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if CUT in record.getMessage():
            self.cut.set()


@pytest.fixture()
def sse_log():
    logger = logging.getLogger("airobackend.sse")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


STREAMS = [("/api/extra/generate/stream", {"prompt": "x", "max_length": 8}),
           ("/v1/completions", {"prompt": "x", "max_tokens": 8, "stream": True}),
           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                                     "stream": True})]


def test_streams_read_to_the_end_log_no_disconnect(sse_log):
    engine, _ = scripted_engine("a complete reply")
    with live(make_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for _ in range(10):
            for path, body in STREAMS:
                with c.stream("POST", path, json=body) as r:
                    text = "".join(r.iter_text())
                assert r.status_code == 200 and text.rstrip().endswith(("[DONE]", "}")), text[-80:]
        # the server has handled every disconnect by the time it answers the next request on a new connection
        assert httpx.get(srv.url + "/health").status_code == 200
    assert not [m for m in sse_log.messages if CUT in m], sse_log.messages


@pytest.mark.parametrize("path,body", STREAMS)
def test_a_client_leaving_mid_stream_is_logged_once(sse_log, path, body):
    engine, model = scripted_engine("x" * 400, delay=0.01, eos=False)
    with live(make_app(engine)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c, \
                c.stream("POST", path, json=dict(body, max_tokens=4000, max_length=400)) as r:
            next(r.iter_raw())                       # the first chunk, then the client goes away
        assert sse_log.cut.wait(30)
    assert sum(CUT in m for m in sse_log.messages) == 1
