"""A scripted model for the timing-sensitive server tests (framing, concurrency, abort, disconnect).

The real `airobackend.engine.Engine` (queue, busy answer, abort, genkey, stop strings, counters) runs over a fake
forward pass that "writes" a fixed reply byte by byte with a controllable delay per token, and a byte-level
tokenizer. So these tests exercise the real engine contract while knowing exactly which text comes out and when.
Tests with the real engine on the demo model use `demo_manager` below (and tests/conftest.py's `demo_model`).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Iterator, Optional

import numpy as np

BOS, EOS, N_SPECIAL = 1, 2, 3
N_VOCAB = N_SPECIAL + 256


class ByteTokenizer:
    """Token id = byte + 3; 1 = BOS, 2 = EOS."""

    bos_id, eos_id, n_vocab = BOS, EOS, N_VOCAB

    def encode(self, text, add_bos: bool = True, special: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([BOS] if add_bos else []) + [b + N_SPECIAL for b in data]

    def token_bytes(self, tid: int, special: bool = False) -> bytes:
        return bytes([tid - N_SPECIAL]) if tid >= N_SPECIAL else b""

    def decode(self, ids) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def piece_text(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", errors="replace")


class ScriptedModel:
    """Predicts the bytes of `reply` one after another after any prompt, then EOS (or loops when `eos` is False).

    A call that does not continue its own last prediction counts as a new prompt and restarts the reply. Each call
    sleeps `delay` seconds (pacing only); `evals` counts calls (for "stopped within a token"). With `hold_at=N` the
    N-th call sets `inside` and waits for `release`: a test acts while a generation is surely under way.
    """

    def __init__(self, reply: str = "Hello from the scripted model!", *, n_ctx: int = 512, delay: float = 0.0,
                 eos: bool = True, hold_at: Optional[int] = None) -> None:
        self.reply = reply.encode("utf-8")
        self.n_ctx, self.n_vocab, self.n_batch = n_ctx, N_VOCAB, 64
        self.delay = delay
        self.eos = eos
        self.evals = 0
        self.cache = CountingCache()
        self._expect: Optional[tuple[int, int]] = None   # (token, position) we predicted last
        self._i = 0
        self.lock = threading.Lock()
        self.hold_at, self.inside, self.release = hold_at, threading.Event(), threading.Event()

    def release_and_hold_at(self, n: int) -> None:
        """Release the held pass and hold the model again at its n-th call (call it while a pass is held)."""
        release = self.release
        with self.lock:
            self.hold_at, self.inside, self.release = n, threading.Event(), threading.Event()
        release.set()

    def eval_spans(self, spans) -> np.ndarray:
        (start, tokens), = spans[-1:]
        self.cache.n_past = start + len(tokens)
        return self.eval(tokens, start)

    def eval(self, tokens, n_past: int, logits_all: bool = False) -> np.ndarray:
        self.cache.n_past = n_past + len(tokens)
        with self.lock:
            self.evals += 1
            held = self.evals == self.hold_at
            inside, release = self.inside, self.release
        if held:
            inside.set()
            assert release.wait(60), "the test never released the held forward pass"     # a hang guard
        if self.delay:
            time.sleep(self.delay)
        tokens = [int(t) for t in tokens]
        if self._expect is not None and len(tokens) == 1 and (tokens[0], n_past) == self._expect:
            self._i += 1
        else:
            self._i = 0
        if self._i < len(self.reply):
            nxt = self.reply[self._i] + N_SPECIAL
        elif self.eos:
            nxt = EOS
        else:
            self._i = 0
            nxt = self.reply[0] + N_SPECIAL
        self._expect = (nxt, n_past + len(tokens))
        logits = np.zeros((1, N_VOCAB), dtype=np.float32)
        logits[0, nxt] = 60.0          # so peaked that every sampler setting picks it
        return logits


class CountingCache:
    """The scripted model's KV cache: only how many positions are filled (the reply does not depend on them)."""

    bytes_per_position = 64

    def __init__(self) -> None:
        self.n_past = 0

    def remove(self, start: int, end: int, n_past: Optional[int] = None) -> int:
        self.n_past = (self.n_past if n_past is None else n_past) - (end - start)
        return self.n_past

    def move(self, src_start: int, src_end: int, dst_start: int) -> None:
        pass

    def truncate(self, n: int) -> None:
        self.n_past = min(self.n_past, n)

    def snapshot(self, n: Optional[int] = None) -> int:
        return self.n_past if n is None else n

    def compatible(self, snap: int) -> Optional[str]:
        return None

    def restore(self, snap: int) -> None:
        self.n_past = snap


class FakeLlama:
    """What Engine reads from a Llama facade: the forward pass, the tokenizer and the file path."""

    def __init__(self, model: ScriptedModel, tokenizer: ByteTokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.model_path = "/srv/private/models/scripted-7b.q4_0.gguf"   # must never reach a client


def scripted_engine(reply: str = "Hello from the scripted model!", *, delay: float = 0.0, eos: bool = True,
                    n_ctx: int = 512, multiuser: int = 1, hold_at: Optional[int] = None):
    """A real Engine over ScriptedModel + ByteTokenizer."""
    from airobackend.engine import Engine
    from airobackend.settings import Settings

    model = ScriptedModel(reply, n_ctx=n_ctx, delay=delay, eos=eos, hold_at=hold_at)
    engine = Engine(FakeLlama(model, ByteTokenizer()),
                    Settings(n_ctx=n_ctx, multiuser=multiuser, template="airoboros"))
    return engine, model


def wait_idle(engine, timeout: float = 60.0) -> bool:
    """Wait, on the engine's own condition (notified as jobs end), until no generation runs."""
    with engine._cond:
        return engine._cond.wait_for(lambda: not engine.is_running(), timeout)


def abort_calls(engine) -> threading.Event:
    """An Event set whenever `engine.abort` is called (a route's abort or a disconnect noticed by the server)."""
    called = threading.Event()
    abort = engine.abort

    def watched(*args, **kwargs):
        try:
            return abort(*args, **kwargs)
        finally:
            called.set()
    engine.abort = watched
    return called


# ---------------------------------------------------------------------------------------------- harness

def make_app(engine, **settings_kw):
    """The full app (all built-in adapters, no entry points) over `engine`."""
    from airobackend.plugins import get_plugin_manager
    from airobackend.server import create_app
    from airobackend.settings import Settings

    settings = Settings(**{"n_ctx": 512, "textgen_stream_port": 0, **settings_kw})
    pm = get_plugin_manager(load_entrypoints=False, blocked=settings.disable_adapters)
    return create_app(engine, settings, pm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread (its own event loop)."""

    def __init__(self, app, settings=None) -> None:
        import uvicorn

        from airobackend.server import uvicorn_config

        self.app = app
        self.port = free_port()
        settings = settings or app.state.settings
        self.ready = threading.Event()          # set once uvicorn listens, or when it gave up

        class Server(uvicorn.Server):
            async def startup(server, sockets=None) -> None:
                try:
                    await super().startup(sockets)
                finally:
                    self.ready.set()

        self.server = Server(uvicorn_config(app, "127.0.0.1", self.port, settings))
        self.server.config.log_level = "warning"
        self.server.install_signal_handlers = lambda: None

        def serve() -> None:
            try:
                asyncio.run(self.server.serve())
            finally:
                self.ready.set()
        self.thread = threading.Thread(target=serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        if not (self.ready.wait(60) and self.server.started):
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def live(app) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


def pick_stop(text: str) -> tuple[int, str]:
    """A 3-character piece of `text` (past its first third) that first occurs at the returned index: stopping on
    it must cut the text exactly there. Used to test stop strings against the real model's output."""
    for i in range(len(text) // 3, len(text) - 3):
        piece = text[i:i + 3]
        if piece.strip() and "\ufffd" not in piece and text.find(piece) == i:
            return i, piece
    raise AssertionError(f"no usable stop string in {text!r}")


LIBRARY_MODELS = ("first.gguf", "second.gguf")


def library_app(library, **settings_kw):
    """(manager, app, client) over a library folder of LIBRARY_MODELS (the demo file twice) whose loads build
    scripted engines, so model switches are instant; `manager.loaded` is set when a load (a background one too)
    has finished. The client reaches the app as a browser reaches the server: at http://127.0.0.1:5001."""
    from starlette.testclient import TestClient

    from airobackend.manager import ModelManager
    from airobackend.plugins import get_plugin_manager
    from airobackend.server import create_app
    from airobackend.settings import Settings

    settings = Settings(**{"model_dir": str(library), "n_ctx": 256, "textgen_stream_port": 0, **settings_kw})
    loaded = threading.Event()
    manager = ModelManager(settings, engine_factory=lambda entry, s, progress: (scripted_engine()[0], None),
                           on_progress=lambda name, fraction: loaded.set() if fraction >= 1.0 else loaded.clear())
    manager.loaded = loaded
    manager.load(LIBRARY_MODELS[0])
    app = create_app(manager, settings, get_plugin_manager(load_entrypoints=False))
    return manager, app, TestClient(app, base_url="http://127.0.0.1:5001")


def demo_manager(path: str, n_ctx: int, multiuser: int = 4, **settings):
    """A ModelManager serving the demo file (its own engine, queue and counters)."""
    from airobackend.manager import ModelManager
    from airobackend.settings import Settings

    manager = ModelManager(Settings(n_ctx=n_ctx, multiuser=multiuser, **settings))
    manager.load(manager.register(path))
    return manager
