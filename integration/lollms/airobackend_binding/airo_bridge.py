"""The host-neutral half of the airobackend integrations: one small interface over two ways to reach the engine.

* `InProcessBackend` runs the engine inside the host's Python process through airobackend's public API
  (`ModelManager` / `Engine.generate(GenerationRequest)`); it needs airobackend installed in the host's environment
  (`INSTALL_HINT`: the project is installed from its folder, it is not on PyPI).
* `RemoteBackend` talks to a running `airobackend serve` over HTTP (OpenAI-style `/v1/completions` with SSE, and
  text-generation-webui's `/v1/internal/*` token routes) with the standard library only, so a host that only points
  at a server needs nothing installed.

Both yield text *deltas*; each host file (text-generation-webui `script.py`, the LoLLMS binding `__init__.py`)
turns them into what its host expects. Generation options use the names of `airobackend.types.SamplingParams`
plus `max_tokens`, `stop` and `add_bos`.

This file is vendored: the same bytes live in integration/text_generation_webui/airobackend/ and
integration/lollms/airobackend_binding/, so either folder can be copied into its host on its own
(tests/integration/test_bridge.py keeps the copies identical).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import urllib.parse
import uuid
from typing import Any, Iterator, Optional, Sequence, Union

# Options every backend understands; values of None mean "the engine's default".
SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "tfs", "top_a", "repetition_penalty",
    "repetition_penalty_range", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "dynatemp_range", "dynatemp_exponent", "seed", "ban_eos", "banned_tokens", "grammar",
)
OPTION_KEYS = ("max_tokens", "stop", "add_bos") + SAMPLING_KEYS

Prompt = Union[str, Sequence[int]]

# What to tell a user whose host lacks the package. Installing it by its bare name would not resolve: the project is not
# on PyPI, so pip installs it from a checkout's folder (or a clone URL, `pip install git+<url>`).
INSTALL_HINT = "pip install /path/to/airobackend (the folder of an airobackend checkout, in this host's Python)"


class BridgeError(RuntimeError):
    """A backend that cannot be reached or that refused a request; the message says which and why."""


class Unreachable(BridgeError):
    """The server cannot be reached, went away, or has no model loaded (HTTP 503): a state that goes away when the
    server is back, unlike a refused request, so hosts report it as their "service unavailable"."""


def check_options(options: dict) -> dict:
    """Drop None values and refuse unknown keys (a typo would otherwise silently fall back to a default)."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise BridgeError(f"unknown generation option(s) {unknown}; known: {list(OPTION_KEYS)}")
    return {k: v for k, v in options.items() if v is not None}


class Stream:
    """One generation: iterate for text deltas; `finish_reason` and token counts are set once it ends.

    `cancel()` may be called from any thread (a host's Stop button); closing the iterator early cancels too.
    """

    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# In-process


class _EngineStream(Stream):
    def __init__(self, engine: Any, request: Any) -> None:
        self._engine, self._request = engine, request
        self._cancelled = threading.Event()
        self._events = None

    def __iter__(self) -> Iterator[str]:
        self._events = self._engine.generate(self._request)
        if self._cancelled.is_set():          # cancelled before the request reached the engine: stop at once
            self._engine.abort(self._request.genkey)
        finished = False
        try:
            for ev in self._events:
                if ev.finish_reason is not None:
                    self.finish_reason = getattr(ev.finish_reason, "value", str(ev.finish_reason))
                    self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
                    finished = True
                if ev.text:
                    yield ev.text
        finally:
            if not finished:
                # The host stopped reading (stop string seen, client gone): free the engine within one token and
                # let its generator run its own clean-up.
                self._engine.abort(self._request.genkey)
                for _ in self._events:
                    pass

    @property
    def genkey(self) -> str:
        """The engine's key of this generation (`engine.partial_text(genkey)` shows its text so far)."""
        return self._request.genkey

    def cancel(self) -> None:
        self._cancelled.set()
        self._engine.abort(self._request.genkey)


class InProcessBackend:
    """The airobackend engine in this process.

    `model` is a GGML/GGUF file path, a name in the model library (`model_dir`), or empty for the bundled demo model.
    """

    def __init__(self, model: str = "", *, model_dir: str = "", n_ctx: int = 2048, n_threads: int = 0,
                 template: str = "") -> None:
        try:
            from airobackend.settings import Settings
        except ImportError as e:  # pragma: no cover - depends on the host's environment
            raise BridgeError(f"in-process mode needs airobackend in this Python environment ({INSTALL_HINT}); "
                              f"or use the remote mode ({e})") from None
        self.settings = Settings(model=model or None, model_dir=model_dir or "models", n_ctx=int(n_ctx),
                                 n_threads=int(n_threads), template=template or None)
        self.engine = self._open(self.settings)

    @staticmethod
    def _open(settings: Any) -> Any:
        """A ModelManager (the model library + the engine of the loaded model), as `airobackend serve` uses."""
        from airobackend.manager import LineProgress, ModelManager
        # Progress lines on the host's console: the hosts show their own log, not airobackend's logger, and a first
        # start compiles the kernels during the load (minutes on a small machine); without them the host would sit
        # at "Loading the extension" in silence.
        manager = ModelManager(settings, on_progress=LineProgress(lambda line: print(f"airobackend: {line}",
                                                                                     flush=True)))
        manager.load(_library_name(manager, settings.model or _demo_path()))
        return manager

    # -- information
    @property
    def model_name(self) -> str:
        return str(self.engine.model_info().get("name") or "airobackend")

    @property
    def n_ctx(self) -> int:
        return int(self.engine.model_info().get("n_ctx") or self.settings.n_ctx)

    def list_models(self) -> list[str]:
        """Names in the model library folder (`model_dir`) and registered files, as `airobackend serve` lists them."""
        return [m["name"] for m in self.engine.list_models()]

    def load_model(self, name: str) -> None:
        """Switch to a library name or a model file path (requests in flight finish first)."""
        self.engine.load(_library_name(self.engine, name))

    # -- tokens
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return [int(t) for t in self.engine.tokenize(text, add_bos=add_bos)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.engine.detokenize([int(t) for t in ids])

    @property
    def bos_id(self) -> Optional[int]:
        ids = self.engine.tokenize("", add_bos=True)
        return int(ids[0]) if ids else None

    # -- generation
    def stream(self, prompt: Prompt, options: dict) -> Stream:
        from airobackend.types import GenerationRequest, SamplingParams
        o = check_options(options)
        sampling = SamplingParams(**{k: _sampling_value(k, o[k]) for k in SAMPLING_KEYS if k in o})
        text, tokens = (prompt, None) if isinstance(prompt, str) else (None, [int(t) for t in prompt])
        req = GenerationRequest(prompt=text, tokens=tokens, max_tokens=int(o.get("max_tokens", 128)),
                                stop=tuple(o.get("stop", ())), add_bos=bool(o.get("add_bos", True)),
                                sampling=sampling, genkey="airo-" + uuid.uuid4().hex)
        return _EngineStream(self.engine, req)

    def close(self) -> None:
        """Release the model (generations in flight are aborted)."""
        self.engine.unload(abort_running=True)


def _sampling_value(key: str, value: Any) -> Any:
    if key == "seed":
        return None if int(value) < 0 else int(value)
    if key == "banned_tokens":
        return tuple(int(t) for t in value)
    return value


def _library_name(manager: Any, model: str) -> str:
    """A file path is registered with the library under its own name; anything else is a library name."""
    return manager.register(model) if os.path.isfile(model) else model


def list_library(model_dir: str) -> list[str]:
    """Model names in a library folder, exactly as `airobackend serve --model-dir` lists them (headers only)."""
    from airobackend.library import ModelLibrary
    if not model_dir or not os.path.isdir(model_dir):
        return []
    return [e.name for e in ModelLibrary(model_dir).scan()]


def _demo_path() -> str:
    from airobackend.demo import demo_model_path
    return str(demo_model_path())


# ----------------------------------------------------------------------------------------------------------------
# Remote: a running `airobackend serve`


class _HTTPStream(Stream):
    """`POST /v1/completions` with `stream: true`, read as server-sent events."""

    def __init__(self, backend: "RemoteBackend", body: dict) -> None:
        self._backend, self._body = backend, body
        self._sock: Optional[socket.socket] = None
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[str]:
        conn = self._backend._connection()
        try:
            conn.request("POST", self._backend._path("/v1/completions"), body=json.dumps(self._body).encode(),
                         headers=self._backend._headers())
            self._sock = conn.sock          # kept so that cancel() can end a blocked read from another thread
            if self._cancelled.is_set():
                return
            resp = conn.getresponse()
            if resp.status != 200:
                raise (Unreachable if resp.status == 503 else BridgeError)(
                    f"{self._backend.url}/v1/completions answered HTTP {resp.status}: "
                    f"{resp.read(2000).decode('utf-8', 'replace')}")
            while not self._cancelled.is_set():
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue            # blank separators, comments (": ping"), "event:" lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage") or {}
                self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
                self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
                if choice.get("text"):
                    yield choice["text"]
        except (OSError, http.client.HTTPException) as e:
            if not self._cancelled.is_set():
                raise Unreachable(f"lost the connection to {self._backend.url}: {e}") from None
        finally:
            # Closing the connection is the stop signal: the server aborts a generation whose client went away.
            conn.close()

    def cancel(self) -> None:
        self._cancelled.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteBackend:
    """A running `airobackend serve` at `url` (e.g. http://127.0.0.1:5001), with an optional API key."""

    def __init__(self, url: str, *, api_key: str = "", timeout: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(url.strip().rstrip("/") if "://" in url else "http://" + url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BridgeError(f"not an http(s) URL: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._parts, self._api_key, self._timeout = parts, api_key.strip(), float(timeout)

    # -- plumbing
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=self._timeout)

    def _path(self, route: str) -> str:
        return self._parts.path.rstrip("/") + route

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self._api_key:
            h["Authorization"] = "Bearer " + self._api_key
        return h

    def _call(self, method: str, route: str, body: Optional[dict] = None) -> Any:
        conn = self._connection()
        try:
            conn.request(method, self._path(route), body=None if body is None else json.dumps(body).encode(),
                         headers=self._headers())
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"cannot reach airobackend at {self.url} ({e}); is `airobackend serve` running?") \
                from None
        finally:
            conn.close()
        if resp.status != 200:
            raise (Unreachable if resp.status == 503 else BridgeError)(
                f"{self.url}{route} answered HTTP {resp.status}: {raw[:2000].decode('utf-8', 'replace')}")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise BridgeError(f"{self.url}{route} did not answer JSON: {raw[:200]!r}") from None

    # -- information
    @property
    def model_name(self) -> str:
        return str(self._call("GET", "/v1/internal/model/info").get("model_name") or "airobackend")

    @property
    def n_ctx(self) -> int:
        info = self._call("GET", "/api/v1/config/max_context_length")
        return int(info.get("value")) if isinstance(info, dict) and info.get("value") else 2048

    def list_models(self) -> list[str]:
        """The server's model library (`/v1/internal/model/list`), else what `/v1/models` lists."""
        try:
            return [str(n) for n in self._call("GET", "/v1/internal/model/list")["model_names"]]
        except (BridgeError, KeyError, TypeError):
            data = self._call("GET", "/v1/models")
            return [m["id"] for m in data.get("data", [])]

    def load_model(self, name: str) -> None:
        self._call("POST", "/v1/internal/model/load", {"model_name": name})

    # -- tokens
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [int(t) for t in self._call("POST", "/v1/internal/encode", {"text": text})["tokens"]]
        bos = self.bos_id
        if not add_bos and ids and ids[0] == bos:
            ids = ids[1:]
        elif add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("POST", "/v1/internal/decode", {"tokens": [int(t) for t in ids]})["text"]

    @property
    def bos_id(self) -> Optional[int]:
        if not hasattr(self, "_bos"):
            empty = self._call("POST", "/v1/internal/encode", {"text": ""})["tokens"]
            self._bos = int(empty[0]) if empty else None
        return self._bos

    # -- generation
    def stream(self, prompt: Prompt, options: dict) -> Stream:
        o = check_options(options)
        if not isinstance(prompt, str):
            prompt = self.detokenize(prompt)
        body: dict = {"prompt": prompt, "stream": True, "max_tokens": int(o.get("max_tokens", 128))}
        if o.get("stop"):
            body["stop"] = list(o["stop"])
        # OpenAI names first, then the text-generation-webui extras (`GenerationOptions`) that frontends send.
        names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "typical_p": "typical_p", "tfs": "tfs", "top_a": "top_a", "repetition_penalty": "repetition_penalty",
                 "repetition_penalty_range": "repetition_penalty_range", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "mirostat": "mirostat_mode",
                 "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "ban_eos": "ban_eos_token",
                 "grammar": "grammar_string", "add_bos": "add_bos_token"}
        for ours, theirs in names.items():
            if ours in o:
                body[theirs] = o[ours]
        if "seed" in o:
            body["seed"] = int(o["seed"])
        if o.get("banned_tokens"):
            body["custom_token_bans"] = ",".join(str(int(t)) for t in o["banned_tokens"])
        if o.get("dynatemp_range"):
            t = float(o.get("temperature", 1.0))
            body.update(dynamic_temperature=True, dynatemp_low=t - o["dynatemp_range"],
                        dynatemp_high=t + o["dynatemp_range"], dynatemp_exponent=o.get("dynatemp_exponent", 1.0))
        return _HTTPStream(self, body)

    def close(self) -> None:
        pass


def same_model(a: str, b: str) -> bool:
    """Whether two names denote the same model file: servers name a model with or without its file extension."""
    def stem(name: str) -> str:
        name = re.sub(r"\.(gguf|bin|zip)$", "", name.strip(), flags=re.IGNORECASE)
        return re.sub(r"\.ggml(v\d)?$", "", name, flags=re.IGNORECASE)
    return stem(a) == stem(b)


def connect(mode: str, *, model: str = "", model_dir: str = "", n_ctx: int = 2048, n_threads: int = 0,
            server_url: str = "", api_key: str = "") -> Union[InProcessBackend, RemoteBackend]:
    """The backend for a host's settings: mode 'in-process' (default) or 'remote'.

    `model`: in-process, a file path or a library name ('' = the demo model); remote, a name from the server's
    library to switch to ('' = whatever the server has loaded).
    """
    mode = (mode or "in-process").strip().lower().replace("_", "-")
    if mode in ("remote", "server", "http"):
        if not server_url:
            raise BridgeError("remote mode needs the URL of a running `airobackend serve` (e.g. http://127.0.0.1:5001)")
        remote = RemoteBackend(server_url, api_key=api_key)
        if model and not same_model(model, remote.model_name):
            remote.load_model(model)      # a name from the server's library; needs the admin (or API) key
        return remote
    if mode in ("in-process", "inprocess", "local"):
        return InProcessBackend(model, model_dir=model_dir, n_ctx=n_ctx, n_threads=n_threads)
    raise BridgeError(f"unknown mode {mode!r}: use 'in-process' or 'remote'")
