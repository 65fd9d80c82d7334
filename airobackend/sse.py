"""Server-sent events, framed byte for byte the way each client parses them.

KoboldAI Lite matches `/^event: (.*)\\ndata: (.*)\\n\\n/m`, so Kobold events use LF only and always carry `event:`.
OpenAI streams are `data: <json>\\n\\n` and end with a *terminated* `data: [DONE]\\n\\n` (KoboldCpp omits the final
blank line, which strict parsers drop). `SSEResponse` is a small ASGI response that sends the stream and watches
for the client going away at the same time, calling `on_disconnect` so the generation can be aborted.
"""
from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable, Optional

import anyio
from starlette.responses import Response

log = logging.getLogger("airobackend.sse")

DONE = b"data: [DONE]\n\n"


def encode_sse(data: Any, event: Optional[str] = None, *, json_kwargs: Optional[dict] = None) -> bytes:
    """One SSE event: optional `event:` line, one `data:` line (dicts/lists become JSON), a blank line. LF only."""
    if not isinstance(data, (str, bytes)):
        data = json.dumps(data, ensure_ascii=False, **(json_kwargs or {}))
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    if "\n" in data or "\r" in data:  # JSON never contains raw newlines; plain text must not either
        raise ValueError("SSE data must be a single line")
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode("utf-8")


SSE_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",   # tell reverse proxies (nginx) not to buffer the stream
}


class SSEResponse(Response):
    """ASGI response streaming pre-encoded SSE chunks from an async iterator.

    While sending, a second task listens for `http.disconnect`; when the client leaves before the last chunk,
    `on_disconnect()` is called (once), the cut is logged, and the iterator is closed. The iterator's own `finally`
    runs in every case. A disconnect after the last chunk is the normal end (uvicorn reports `http.disconnect` to
    every receive once the response is complete, and clients close the connection then): nothing is logged.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], *, on_disconnect: Optional[Callable[[], None]] = None,
                 status_code: int = 200, headers: Optional[dict] = None) -> None:
        super().__init__(status_code=status_code)   # (a Response, so FastAPI passes it through untouched)
        self.chunks = chunks
        self.on_disconnect = on_disconnect
        self.extra_headers = {**SSE_HEADERS, **(headers or {})}
        self.disconnected = False
        self.complete = False           # every chunk has been sent: a disconnect now is the stream's normal end

    async def __call__(self, scope, receive, send) -> None:
        raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.extra_headers.items()]

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self._client_gone()
                    tg.cancel_scope.cancel()
                    return

        async def stream() -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.complete = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the transport broke under us (ASGI spec 2.4 servers report disconnects this way)
                self._client_gone()
            finally:
                tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                tg.start_soon(stream)
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    def _client_gone(self) -> None:
        if self.disconnected or self.complete:
            return
        self.disconnected = True
        log.info("client disconnected mid-stream")
        if self.on_disconnect is not None:
            self.on_disconnect()
