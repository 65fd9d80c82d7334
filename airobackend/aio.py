"""Bridge the engine's blocking `generate()` iterator to async code.

Each generation runs in its own worker thread, which pushes events into an asyncio queue through
`loop.call_soon_threadsafe`; the event loop never blocks, so check/abort/tokencount routes and other clients are
answered while a model decodes. `cancel()` (client went away, or the handler was cancelled) calls
`engine.abort(key)` for exactly this request, and the worker stops reading after the next event.

The engine validates and queues a request when `generate()` is called (EngineBusy, RequestError,
ContextOverflowError, ModelNotLoaded are raised there); the events come later, after any wait in the queue and the
prompt evaluation, which takes minutes for a long prompt on a 65B model. So `start()` returns as soon as the engine
has *accepted* the request, or raises its refusal: a handler chooses the HTTP status before any header is sent, and
a streaming response can send its headers (and keep-alive comments) while the prompt is evaluated.

Once the headers are out no status can report a failure any more: `live_events` is the one loop every streaming
route reads its events through, so that a failure mid-stream is logged once and each protocol ends its stream in
the way its clients understand.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any, AsyncIterator, Optional

from .types import EngineAPI, GenerationEvent, GenerationRequest

log = logging.getLogger("airobackend.aio")

_END = object()
_ACCEPTED = object()
PING: Any = object()       # live_events: no event came for `keepalive` seconds
FAILED: Any = object()     # live_events: the engine failed after the response's headers went out


class GenerationStream:
    """Async iterator over the `GenerationEvent`s of one request, produced in a worker thread.

    Usage::

        stream = GenerationStream(engine, req)
        await stream.start()                # raises the engine's refusal (busy, bad request, no model)
        async for ev in stream: ...         # the events; the last one has finish_reason set
        await stream.aclose()               # aborts if not finished; always safe
    """

    def __init__(self, engine: EngineAPI, req: GenerationRequest) -> None:
        self.engine = engine
        self.req = req
        if not req.request_id:
            req.request_id = "airo-" + uuid.uuid4().hex[:16]
        self.finished = False
        self.cancelled = False
        self._queue: Optional[asyncio.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    @property
    def abort_key(self) -> str:
        """The key `engine.abort()` is called with: the client's genkey, else our request id."""
        return self.req.genkey or self.req.request_id  # type: ignore[return-value]

    async def start(self) -> None:
        """Start the worker and wait until the engine accepted the request (or raise what it refused it with)."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # event loop closed (server shutting down): nobody is listening
                self._stop.set()

        def work() -> None:
            gen = None
            try:
                if self._stop.is_set():
                    put(_END)
                    return
                gen = self.engine.generate(self.req)
                put(_ACCEPTED)
                if self._stop.is_set():   # cancelled while waiting to be accepted (e.g. during a model load)
                    put(_END)
                    return
                for ev in gen:
                    put(ev)
                    if self._stop.is_set():
                        break
                put(_END)
            except BaseException as e:  # delivered to the awaiting handler
                put(e)
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:  # pragma: no cover - engine cleanup errors are logged, not raised
                        log.exception("closing the engine generator failed")

        self._thread = threading.Thread(target=work, name=f"generate-{self.req.request_id}", daemon=True)
        self._thread.start()
        try:
            item = await self._queue.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item is not _ACCEPTED:      # (cannot happen with an engine that follows the contract)
            self._queue.put_nowait(item)

    async def next_event(self, timeout: Optional[float] = None) -> Optional[GenerationEvent]:
        """The next event; None if none came within `timeout` seconds (nothing is lost: ask again)."""
        if timeout is None:
            return await self._next()
        try:
            return await asyncio.wait_for(self._next(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _next(self) -> GenerationEvent:
        assert self._queue is not None, "start() first"
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while item is _ACCEPTED:
            item = await self._queue.get()
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
            self._stop.set()
        return item

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self

    async def __anext__(self) -> GenerationEvent:
        return await self._next()

    def cancel(self) -> None:
        """Abort this generation (idempotent; harmless if it already finished or raced to completion)."""
        if self.cancelled:
            return
        self.cancelled = True
        self._stop.set()
        if self.finished:
            return
        try:
            self.engine.abort(self.abort_key)
        except Exception:  # pragma: no cover - abort must never take the server down
            log.exception("engine.abort(%r) failed", self.abort_key)

    async def aclose(self) -> None:
        if not self.finished:
            self.cancel()


async def collect(stream: GenerationStream, logprobs: Optional[list] = None) -> tuple[str, Optional[GenerationEvent]]:
    """Start `stream` and concatenate its text; returns (text, last event). The events' logprob entries are added
    to `logprobs` when it is given."""
    await stream.start()
    parts: list[str] = []
    last = None
    async for ev in stream:
        parts.append(ev.text)
        if logprobs is not None and ev.logprobs:
            logprobs.extend(ev.logprobs)
        last = ev
    return "".join(parts), last


async def live_events(stream: GenerationStream, keepalive: Optional[float] = None) -> AsyncIterator[Any]:
    """The events of a started stream up to its last one (the one with finish_reason), for a response whose
    headers are out: `PING` after each `keepalive` seconds without an event (None: no pings); `FAILED` once, the
    error logged, when the engine fails. The stream is closed (aborted if unfinished) when this ends or is closed;
    read it under `contextlib.aclosing` so that happens at once when the reader stops early."""
    try:
        while True:
            ev = await stream.next_event(keepalive)
            if ev is None:
                yield PING
                continue
            yield ev
            if ev.finish_reason is not None:
                return
    except StopAsyncIteration:          # ended without a last event (aborted before it)
        return
    except Exception as e:
        log.error("generation failed mid-stream: %s", e)
        yield FAILED
    finally:
        await stream.aclose()
