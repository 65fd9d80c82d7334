"""The ASGI app: routes come from the adapter plugins; this module owns what every route shares.

- `create_app(engine, settings, pm)`: a FastAPI app (OpenAPI page at `/docs`) with the routes of every registered
  adapter, behind one ASGI middleware (`Guard`) that does, in order: path normalisation (KoboldCpp accepts a
  trailing `/` and `/api/latest/`), the `Host` check against DNS rebinding (loopback listeners answer only loopback
  names and `--allowed-hosts`), CORS (generation from any origin unless `--cors` restricts it; admin routes only for
  origins listed with `--cors`), the API key (401 in the protocol's shape; WebSockets refused before the handshake),
  the admin decision (`require_admin`) and the request body cap.
- `require_admin` / `ADMIN`: the one check every admin route uses (model load/unload/switch, config reload, slot
  save/restore): the admin key, or the API key when no admin key is set, or no key at all when none is configured;
  a web page of another origin additionally needs its origin listed with `--cors` and must present the key.
- Errors: `describe_error` says what went wrong without a protocol (`ErrorInfo`: status, message, kind, param);
  the adapters give it their protocol's shape through the `error_response` hook, by path (OpenAI's under `/v1`,
  KoboldCpp's elsewhere); `error_response` here adds the HTTP headers (retry-after, www-authenticate).
- `Fields`: typed access to a JSON body with clear per-field errors (wrong type, NaN, out of range).
- `serve()`: runs uvicorn (WebSockets via the `websockets` package) on the main port and any extra listeners
  (text-generation-webui's streaming port 5005) in one event loop.
"""
from __future__ import annotations

import asyncio
import hmac
import html
import ipaddress
import json
import logging
import math
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional
from urllib.parse import parse_qs

import anyio
import pluggy
from fastapi import APIRouter, Depends, FastAPI
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from . import __version__
from .errors import (AiroError, BackendUnavailable, ContextOverflowError, EngineBusy, FieldError, ModelNotLoaded,
                     RequestError, check_token_ids)
from .demo import BANNER, is_demo_model
from .plugins import get_plugin_manager
from .settings import Settings
from .tools import has_tool_messages, polyfill_messages
from .types import DEFAULT_SAMPLER_ORDER, EngineAPI, SamplingParams

log = logging.getLogger("airobackend.server")

# Routes that answer without the API key, as KoboldCpp answers them with --password: the connect probes of
# KoboldAI Lite / SillyTavern (model name masked, version says protected), model list, health and the API docs
# (with their Swagger UI files under DOCS_ASSETS).
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/"), ("GET", "/health"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/openapi.json"),
    ("GET", "/api"),
    ("GET", "/api/v1/model"), ("GET", "/api/v1/info/version"), ("GET", "/api/extra/version"),
    ("GET", "/api/v1/config/max_length"), ("GET", "/api/v1/config/max_context_length"),
    ("GET", "/api/extra/true_max_context_length"), ("GET", "/api/extra/preloadstory"),
    ("GET", "/sdapi/v1/sd-models"), ("GET", "/v1/models"),
})

# Host names a loopback listener answers to besides loopback addresses (RFC 6761: browsers resolve *.localhost to
# the loopback interface themselves, so no DNS answer can point these names elsewhere).
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")

DOCS_ASSETS = "/docs/assets"       # Swagger UI's files (public, as /docs is)

MAX_HEADER_BYTES = 16 * 1024     # h11's incomplete-event limit: bounds request line + headers


# ---------------------------------------------------------------------------------------------- errors and bodies

class BodyTooLarge(RequestError):
    """The request body exceeds --max-body-bytes."""


class AdminRefused(AiroError):
    """An admin action asked for without the right to it: 401 when the key would fix it, 403 when the asking web
    page's origin is not one the admin listed with --cors."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


# What went wrong, in words every protocol maps to its own: the `kind` of an ErrorInfo.
ERROR_KINDS = frozenset({
    "missing_key",          # no or a wrong API key (401)
    "unauthorized",         # an admin action without the admin key (401)
    "forbidden",            # an admin action from a web page of an origin not listed with --cors (403)
    "too_large",            # the body exceeds --max-body-bytes (413)
    "busy",                 # the queue is full (503, retry-after)
    "not_loaded",           # no model is loaded (503)
    "backend_unavailable",  # a part of the model on another machine failed or is restarting (503, retry-after)
    "context_length",       # prompt + max tokens do not fit the context (400)
    "bad_request",          # a field with the wrong type or value (400; `param` names it)
    "not_found",            # no such route (404)
    "method_not_allowed",   # the route exists for other methods (405)
    "server_error",         # anything else (500)
})
RETRY_AFTER = {"busy": "1", "backend_unavailable": "5"}      # seconds a client should wait before asking again
MISSING_KEY = "Authentication key is missing or invalid."
BUSY = "Server is busy; please try again later."


@dataclass(frozen=True)
class ErrorInfo:
    """An error to answer, before any protocol's shape (hookspecs.error_response)."""
    status: int
    message: str
    kind: str
    param: Optional[str] = None


def describe_error(exc: BaseException) -> ErrorInfo:
    """What an exception means for the client, decided *by class* (never by message text)."""
    msg = str(exc) or exc.__class__.__name__
    if isinstance(exc, AdminRefused):
        return ErrorInfo(exc.status, msg, "unauthorized" if exc.status == 401 else "forbidden")
    if isinstance(exc, BodyTooLarge):
        return ErrorInfo(413, msg, "too_large")
    if isinstance(exc, EngineBusy):
        return ErrorInfo(503, BUSY, "busy")
    if isinstance(exc, ModelNotLoaded):
        return ErrorInfo(503, msg, "not_loaded")
    if isinstance(exc, BackendUnavailable):
        return ErrorInfo(503, msg, "backend_unavailable")
    if isinstance(exc, ContextOverflowError):
        return ErrorInfo(400, msg, "context_length")
    if isinstance(exc, RequestError):
        return ErrorInfo(400, msg, "bad_request", getattr(exc, "param", None))
    if isinstance(exc, AiroError):
        return ErrorInfo(500, msg, "server_error")
    return ErrorInfo(500, f"Internal error: {exc.__class__.__name__}: {msg}", "server_error")


def error_response(pm: Optional[pluggy.PluginManager], path: str, method: str, error: ErrorInfo) -> Response:
    """`error` in the shape of the protocol that owns `path` (the first adapter that answers the `error_response`
    hook; Starlette's plain `{"detail": message}` when none does), with the headers HTTP asks for."""
    resp = pm.hook.error_response(path=path, method=method, error=error) if pm is not None else None
    if resp is None:
        resp = JSONResponse({"detail": error.message}, status_code=error.status)
    if error.kind in RETRY_AFTER:
        resp.headers["retry-after"] = RETRY_AFTER[error.kind]
    elif error.status == 401:
        resp.headers["www-authenticate"] = "Bearer"
    return resp


def error_for_exception(pm: Optional[pluggy.PluginManager], path: str, exc: BaseException,
                        method: str = "POST") -> Response:
    """The protocol's error response for an exception raised while serving `path`."""
    error = describe_error(exc)
    if error.kind == "server_error" and not isinstance(exc, AiroError):
        log.error("unexpected error on %s", path, exc_info=exc)
    return error_response(pm, path, method, error)


def _reject_constant(name: str) -> Any:
    raise FieldError(f"invalid JSON number {name!r} (NaN and Infinity are not allowed)")


async def read_json(request: Request, *, allow_empty: bool = False) -> dict:
    """The request body as a JSON object; FieldError for bad UTF-8/JSON/non-object, BodyTooLarge past the cap."""
    body = await request.body()
    if not body.strip():
        if allow_empty:
            return {}
        raise FieldError("request body is empty; a JSON object is required")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FieldError(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise FieldError(f"Error parsing input: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        if allow_empty and value is None:
            return {}
        raise FieldError(f"request body must be a JSON object, not {type(value).__name__}")
    return value


class Fields:
    """Typed, validated access to a JSON object. Numbers may arrive as numeric strings (old clients send them);
    anything else of the wrong type, NaN/inf, or out of range raises `FieldError` naming the field."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload

    def has(self, *names: str) -> bool:
        return any(self.payload.get(n) is not None for n in names)

    def raw(self, *names: str) -> tuple[Optional[str], Any]:
        for n in names:
            v = self.payload.get(n)
            if v is not None:
                return n, v
        return None, None

    def number(self, names: str | tuple, default: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
               integer: bool = False, clamp: bool = False) -> Any:
        names = (names,) if isinstance(names, str) else names
        name, v = self.raw(*names)
        if name is None:
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise FieldError(f"'{name}' must be {kind}, got {type(v).__name__}", name)
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise FieldError(f"'{name}' must be {kind}, got {v[:40]!r}", name) from None
        if not math.isfinite(v):
            raise FieldError(f"'{name}' must be finite", name)
        if integer:
            if v != int(v):
                raise FieldError(f"'{name}' must be an integer, got {v}", name)
            v = int(v)
        elif isinstance(v, int):
            v = float(v)
        if lo is not None and v < lo:
            if not clamp:
                raise FieldError(f"'{name}' must be >= {lo}, got {v}", name)
            v = type(v)(lo)
        if hi is not None and v > hi:
            if not clamp:
                raise FieldError(f"'{name}' must be <= {hi}, got {v}", name)
            v = type(v)(hi)
        return v

    def int(self, names: str | tuple, default: Any, **kw: Any) -> Any:
        return self.number(names, default, integer=True, **kw)

    def float(self, names: str | tuple, default: Any, **kw: Any) -> Any:
        return self.number(names, default, **kw)

    def bool(self, names: str | tuple, default: Any) -> Any:
        names = (names,) if isinstance(names, str) else names
        name, v = self.raw(*names)
        if name is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return v.strip().lower() in ("true", "1", "yes", "on")
        raise FieldError(f"'{name}' must be a boolean, got {str(v)[:40]!r}", name)

    def str(self, names: str | tuple, default: Any) -> Any:
        names = (names,) if isinstance(names, str) else names
        name, v = self.raw(*names)
        if name is None:
            return default
        if not isinstance(v, str):
            raise FieldError(f"'{name}' must be a string, got {type(v).__name__}", name)
        return v

    def str_list(self, names: str | tuple, default: Any = (), *, max_items: int = 64) -> tuple[str, ...]:
        """A list of strings; a single string counts as a one-item list (OpenAI `stop` allows both)."""
        names = (names,) if isinstance(names, str) else names
        name, v = self.raw(*names)
        if name is None:
            return tuple(default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise FieldError(f"'{name}' must be a string or a list of strings", name)
        if len(v) > max_items:
            raise FieldError(f"'{name}' has {len(v)} entries; at most {max_items} are allowed", name)
        return tuple(s for s in v if s)

    def logit_bias(self, names: str | tuple, n_vocab: int, *, max_items: int = 1024,
                   bound: float = 100.0) -> dict[int, float]:
        """{"<token id>": bias} (string or int keys; also KoboldCpp's list form [[id, bias], ...]). Clamped to
        +-bound, since llama.cpp/KoboldCpp clamp to 100; ids outside the vocabulary are an error."""
        names = (names,) if isinstance(names, str) else names
        name, v = self.raw(*names)
        if name is None:
            return {}
        items: Iterable
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
            items = v
        else:
            raise FieldError(f"'{name}' must be an object mapping token ids to numbers", name)
        items = list(items)
        if len(items) > max_items:
            raise FieldError(f"'{name}' has {len(items)} entries; at most {max_items} are allowed", name)
        out: dict[int, float] = {}
        for k, b in items:
            try:
                tid = int(k) if not isinstance(k, bool) else None
            except (TypeError, ValueError):
                tid = None
            if tid is None or not 0 <= tid < n_vocab:
                raise FieldError(f"'{name}': {str(k)[:20]!r} is not a token id (0..{n_vocab - 1})", name)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                raise FieldError(f"'{name}': the bias of token {tid} must be a finite number", name)
            out[tid] = max(-bound, min(bound, float(b)))
        return out


def llama_timings(ev: Any) -> dict:
    """llama.cpp server's `timings` object for a finished generation (tools/server result_timings::to_json):
    cache_n = prompt tokens reused from the KV cache, prompt_n = prompt tokens evaluated, predicted_n = generated."""
    cache_n = int(getattr(ev, "cached_tokens", 0) or 0)
    prompt_n = max(0, int(ev.prompt_tokens) - cache_n)
    predicted_n = int(ev.completion_tokens)
    p_ms, g_ms = 1e3 * float(ev.prompt_seconds or 0.0), 1e3 * float(ev.generation_seconds or 0.0)
    return {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": p_ms,
            "prompt_per_token_ms": p_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1e3 * prompt_n / p_ms if p_ms > 0 else 0.0,
            "predicted_n": predicted_n, "predicted_ms": g_ms,
            "predicted_per_token_ms": g_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1e3 * predicted_n / g_ms if g_ms > 0 else 0.0}


# ---------------------------------------------------------------------------------------------- disconnects

async def run_watching_disconnect(request: Request, work: Awaitable[Any], on_disconnect: Callable[[], None]) -> Any:
    """Await `work` while listening for the client going away; on disconnect call `on_disconnect()` (which aborts the
    generation) and still wait for `work` to wind down. The body must already have been read."""
    result: list[Any] = []
    failure: list[Exception] = []

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                log.info("client disconnected; aborting its generation")
                on_disconnect()
                return

    async with anyio.create_task_group() as tg:
        async def run() -> None:
            try:
                result.append(await work)
            except Exception as e:  # re-raised bare below, not wrapped in an ExceptionGroup
                failure.append(e)
            finally:
                tg.cancel_scope.cancel()
        tg.start_soon(watch)
        tg.start_soon(run)
    if failure:
        raise failure[0]
    return result[0]


# ---------------------------------------------------------------------------------------------- middleware

def sees_names(request: Any, settings: Settings) -> bool:
    """Whether this client may see model names: always without --api-key; with it, only when it sent the key (the
    routes that answer without the key mask the name, as KoboldCpp's probes do)."""
    return not settings.api_key or bool(request.scope.get("airo.authenticated", False))


def loaded_model_name(engine: EngineAPI) -> Optional[str]:
    """The served model's name, None when no model is loaded."""
    try:
        return str(engine.model_info()["name"])
    except ModelNotLoaded:
        return None


def require_admin(request: Request) -> None:
    """The admin check of every admin route: `dependencies=[ADMIN]` on the route, or called inside a handler whose
    admin-ness depends on the body (text-generation-webui's POST /api/v1/model load/unload). The Guard decided when
    the request came in (`Guard.admin_refusal`); this raises its refusal, answered in the route's protocol shape."""
    refusal = request.scope.get("airo.admin_refusal")
    if refusal is not None:
        message, status = refusal
        if status == 403:
            log.warning("refused an admin action on %s: %s", request.url.path, message)
        raise AdminRefused(message, status)


ADMIN = Depends(require_admin)
# openapi_extra key marking a route that calls require_admin itself for some actions: the Guard answers CORS for
# it as for any admin route, and the OpenAPI page shows which actions are admin.
ADMIN_ACTIONS = "x-admin-actions"


def is_admin_route(route: Any) -> bool:
    dependant = getattr(route, "dependant", None)
    if dependant is not None and any(d.call is require_admin for d in dependant.dependencies):
        return True
    return bool((getattr(route, "openapi_extra", None) or {}).get(ADMIN_ACTIONS))


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, no port) can only mean this machine."""
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(host: Any) -> bool:
    try:
        ipaddress.ip_address(str(host))
        return True
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name of a `Host` header: port and IPv6 brackets removed, lower case, no trailing dot."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.lower().rstrip(".")


class Guard:
    """Pure ASGI middleware: path normalisation, Host check, CORS, HEAD, API key (HTTP + WebSocket), the admin
    decision, body cap."""

    def __init__(self, app: Any, settings: Settings, routes: Iterable = (),
                 pm: Optional[pluggy.PluginManager] = None) -> None:
        self.app = app
        self.pm = pm
        self.api_key = settings.api_key or None
        self.admin_key = settings.admin_key or None
        self.max_body = int(settings.max_body_bytes)
        origins = [o.strip().rstrip("/") for o in (settings.cors or "").split(",") if o.strip()]
        self.any_origin = not origins or "*" in origins
        self.origins = frozenset(o for o in origins if o != "*")     # listed by name: the only ones trusted with admin
        self.check_host = is_loopback(settings.host)
        self.allowed_hosts = frozenset(host_name(h) for h in settings.allowed_hosts if h.strip())
        self.routes = routes          # the app's route list (read at the first request: plugins add routes late)
        self._admin_routes: Optional[list] = None
        self._warned_hosts: set[str] = set()

    # -- helpers
    @staticmethod
    def normalise(path: str) -> str:
        if path.startswith("/api/latest/") or path == "/api/latest":
            path = "/api/v1" + path[len("/api/latest"):]
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        return path

    def host_allowed(self, scope: dict, headers: dict) -> bool:
        """DNS rebinding: a page of evil.example whose name is re-pointed to 127.0.0.1 reaches a loopback listener as
        `Host: evil.example`, and the browser counts it as evil.example's own origin, so neither CORS nor the Origin
        check sees anything foreign. A loopback listener therefore answers only names no DNS answer can re-point
        (loopback addresses, localhost, *.localhost) and the names given with --allowed-hosts, as Jupyter does.
        A call with no listening socket (in-process ASGI: `scope["server"]` is not an address) has no browser."""
        if not self.check_host or "*" in self.allowed_hosts:
            return True
        server = scope.get("server")
        if not server or not _is_address(server[0]):
            return True
        host = headers.get("host")
        if host is None:            # HTTP/1.0 without Host; browsers always send it
            return True
        name = host_name(host)
        return is_loopback(name) or name in self.allowed_hosts

    @staticmethod
    def foreign_origin(headers: dict) -> Optional[str]:
        """The origin of a browser request made by a page of another origin; None for the server's own pages and
        for clients outside a browser (scripts, SillyTavern's server, text-generation-webui API clients)."""
        origin = headers.get("origin")
        if origin is None:
            # Browsers send Origin with every cross-origin fetch and every POST; Sec-Fetch-Site tells the rest
            # (navigations, <img>, forms of browsers that omit Origin on GET).
            site = headers.get("sec-fetch-site", "").lower()
            return f"(a {site} page)" if site in ("cross-site", "same-site") else None
        scheme, sep, netloc = origin.strip().lower().partition("://")
        host = headers.get("host", "").strip().lower()
        default_port = {"http": ":80", "https": ":443"}.get(scheme, "")
        if sep and host and host in (netloc, netloc + default_port):
            return None
        return origin

    def is_listed(self, origin: Optional[str]) -> bool:
        return origin is not None and origin.rstrip("/") in self.origins

    def is_admin_path(self, path: str, method: str) -> bool:
        if self._admin_routes is None:
            self._admin_routes = [r for r in self.routes if is_admin_route(r)]
        probe = {"type": "http", "path": path, "root_path": "", "method": method}
        return any(r.matches(probe)[0] == Match.FULL for r in self._admin_routes)

    def cors_headers(self, origin: Optional[str], admin_route: bool) -> list[tuple[bytes, bytes]]:
        """Origins listed with --cors are echoed, with credentials allowed; any other origin gets `*` (never
        echoed, never with credentials), and admin routes answer only listed origins."""
        if self.is_listed(origin):
            return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),  # type: ignore
                    (b"access-control-allow-credentials", b"true")]
        if self.any_origin and not admin_route:
            return [(b"access-control-allow-origin", b"*")]
        return []

    def check_key(self, headers: dict, query: bytes, websocket: bool) -> tuple[bool, bool]:
        """(authenticated, admin) for the key this request presents; both True when no key is configured."""
        presented = None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        elif headers.get("x-api-key"):
            presented = headers["x-api-key"].strip()
        elif websocket and query:  # browsers cannot set headers on a WebSocket: ?api_key=... is accepted there
            q = parse_qs(query.decode("latin-1"))
            presented = (q.get("api_key") or q.get("key") or [None])[0]

        def same(a: Optional[str], b: Optional[str]) -> bool:
            return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())

        is_admin = same(presented, self.admin_key) if self.admin_key else None
        if self.api_key is None:
            authenticated = True
        else:
            authenticated = same(presented, self.api_key) or bool(is_admin)
        admin = bool(is_admin) if self.admin_key else authenticated
        return authenticated, admin

    def admin_refusal(self, admin: bool, foreign: Optional[str]) -> Optional[tuple[str, int]]:
        """Why this request may not perform admin actions, as (message, HTTP status); None when it may.

        Without Origin, or from the server's own pages, the key decides (no key configured: everyone on the
        machine is admin, as text-generation-webui and KoboldCpp allow). A page of another origin could be any site
        the user has open, so it needs both its origin listed with --cors and the key presented."""
        if foreign is not None:
            if not self.is_listed(foreign):
                return (f"Admin actions are refused to web pages of other origins ({foreign}); start the server "
                        f"with --cors ORIGIN and --admin-key KEY to allow one page.", 403)
            if not (self.api_key or self.admin_key):
                return ("Admin actions from a web page need a key: start the server with --admin-key KEY "
                        "(or --api-key KEY).", 403)
        if admin:   # with a key configured, `admin` means the request presented it
            return None
        return "This is an admin action: the admin key (or the API key when no admin key is set) is required.", 401

    # -- ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = self.normalise(scope["path"])
        if path != scope["path"]:
            scope = dict(scope, path=path, raw_path=path.encode("utf-8"))
        raw_headers = scope.get("headers", [])
        websocket = scope["type"] == "websocket"
        if sum(len(k) + len(v) + 4 for k, v in raw_headers) > MAX_HEADER_BYTES:
            # h11 bounds only headers that arrive in pieces; a header block sent in one go is bounded here
            if websocket:
                await receive()
                return await send({"type": "websocket.close", "code": 1009, "reason": "headers too large"})
            return await self._plain(send, 431, b"Request header fields too large", [])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        if not self.host_allowed(scope, headers):
            name = host_name(headers.get("host", ""))
            if name not in self._warned_hosts and len(self._warned_hosts) < 64:
                self._warned_hosts.add(name)
                log.warning("refused requests for Host %r (a loopback listener answers loopback names only; "
                            "--allowed-hosts NAME adds one)", name[:100])
            body = b"Host not allowed: this server answers only for localhost names (see --allowed-hosts)"
            if websocket:
                return await self._deny_websocket(scope, receive, send, 403, body)
            return await self._plain(send, 403, body, [])
        origin = headers.get("origin")
        authenticated, admin = self.check_key(headers, scope.get("query_string", b""), websocket)
        refusal = self.admin_refusal(admin, self.foreign_origin(headers))
        scope["airo.authenticated"] = authenticated
        scope["airo.admin"] = refusal is None
        scope["airo.admin_refusal"] = refusal

        if websocket:
            if origin and not self.any_origin and not self.is_listed(origin):
                # Browsers apply no CORS to WebSockets: with --cors restricting origins, the server refuses the
                # handshake from a page of any other origin itself (clients outside a browser send no Origin).
                return await self._deny_websocket(scope, receive, send, 403, b"CORS origin not allowed")
            if not authenticated:
                return await self._deny_websocket(scope, receive, send)
            return await self.app(scope, receive, send)

        method = scope["method"]
        if method == "OPTIONS":  # CORS preflight, answered without auth (browsers never send credentials here)
            asked = headers.get("access-control-request-method", "GET").strip().upper() or "GET"
            cors = self.cors_headers(origin, self.is_admin_path(path, asked))
            if origin and not cors:
                return await self._plain(send, 403, b"CORS origin not allowed", [])
            req_headers = headers.get("access-control-request-headers", "*") or "*"
            extra = [(b"access-control-allow-methods", b"GET, POST"),
                     (b"access-control-allow-headers", req_headers.encode("latin-1")),
                     (b"access-control-max-age", b"600")]
            return await self._plain(send, 200, b"", cors + extra, content_type=b"text/html")
        cors = self.cors_headers(origin, self.is_admin_path(path, method))
        if method == "HEAD":  # KoboldCpp answers HEAD on any path with 200; nothing is computed or leaked
            return await self._plain(send, 200, b"", cors)
        if not authenticated and (method, path) not in PUBLIC_ROUTES and not path.startswith(DOCS_ASSETS + "/"):
            return await self._error(send, path, method, ErrorInfo(401, MISSING_KEY, "missing_key"), cors)

        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await self._error(send, path, method, describe_error(
                    FieldError("invalid Content-Length header")), cors)
            if n > self.max_body:
                return await self._error(send, path, method, describe_error(BodyTooLarge(
                    f"Payload is too big: {n} bytes; the limit is {self.max_body} bytes.")), cors)

        received = 0
        max_body = self.max_body

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise BodyTooLarge(f"Payload is too big; the limit is {max_body} bytes.")
            return message

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = dict(message, headers=list(message.get("headers", [])) + cors)
            await send(message)

        await self.app(scope, capped_receive, send_with_cors)

    async def _deny_websocket(self, scope, receive, send, status: int = 401, reason: Optional[bytes] = None) -> None:
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            if status == 401:
                resp = error_response(self.pm, scope.get("path", ""), "GET", ErrorInfo(401, MISSING_KEY, "missing_key"))
                body, headers = resp.body, [(k, v) for k, v in resp.raw_headers if k != b"content-length"]
            else:
                body, headers = reason or b"", [(b"content-type", b"text/plain")]
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008,
                        "reason": "API key missing or invalid" if status == 401 else (reason or b"").decode()})

    @staticmethod
    async def _plain(send, status: int, body: bytes, headers: list, content_type: bytes = b"text/plain") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
                    + headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send, path: str, method: str, error: ErrorInfo, cors: list) -> None:
        resp = error_response(self.pm, path, method, error)
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": list(resp.raw_headers) + cors})
        await send({"type": "http.response.body", "body": resp.body})


# ---------------------------------------------------------------------------------------------- the app

def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own errors (no route, wrong method) in the protocol's shape."""
    path, method = request.url.path, request.method
    if exc.status_code == 404:
        error = ErrorInfo(404, f"Unknown endpoint {method} {path}", "not_found")
    elif exc.status_code == 405:
        error = ErrorInfo(405, f"Method {method} not allowed on {path}", "method_not_allowed")
    else:
        error = ErrorInfo(exc.status_code, str(exc.detail), "bad_request")
    return error_response(getattr(request.app.state, "pm", None), path, method, error)


def create_app(engine: EngineAPI, settings: Settings, pm: Optional[pluggy.PluginManager] = None) -> FastAPI:
    """Build the ASGI app serving every registered adapter's routes for `engine` (an Engine or ModelManager)."""
    if pm is None:
        pm = get_plugin_manager(blocked=settings.disable_adapters)
    # /docs: Swagger UI from the files fastapi-offline ships (FastAPI's own page loads them from a CDN and is blank
    # offline).
    app = FastAPIOffline(title="airobackend", version=__version__, docs_url="/docs", redoc_url=None,
                         static_url=DOCS_ASSETS, openapi_url="/openapi.json",
                         description="KoboldAI/KoboldCpp, text-generation-webui and OpenAI-compatible APIs.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.pm = pm
    app.state.extra_listeners = []

    seen: set[tuple[str, frozenset]] = set()
    for routes in pm.hook.register_routes(engine=engine, settings=settings, pm=pm):
        if routes is None:
            continue
        items = routes.routes if isinstance(routes, APIRouter) else list(routes)
        for route in items:
            key = (getattr(route, "path", ""), frozenset(getattr(route, "methods", None) or {"WEBSOCKET"}))
            if key in seen:  # an earlier plugin already serves this path+method (e.g. GET /api/v1/model)
                continue
            seen.add(key)
            app.router.routes.append(route)

    @app.get("/health", include_in_schema=True, tags=["server"])
    async def health() -> Any:
        """Liveness probe (answers without the API key). A model spread over machines (Ray stages or replicas)
        says how each part is; 503 when it cannot serve at all."""
        try:
            report = await run_in_threadpool(engine.health)
        except (AttributeError, ModelNotLoaded):
            report = {"status": "ok"}
        return JSONResponse(report, status_code=503 if report.get("status") == "error" else 200)

    if not any(getattr(r, "path", None) == "/" for r in app.router.routes):
        @app.get("/", include_in_schema=False)
        async def index(request: Request) -> HTMLResponse:
            return HTMLResponse(index_page(request, engine, settings, pm))

    app.add_exception_handler(StarletteHTTPException, _http_error)

    async def airo_error(request: Request, exc: Exception) -> Response:
        return error_for_exception(pm, request.url.path, exc, request.method)

    app.add_exception_handler(AiroError, airo_error)
    app.add_exception_handler(Exception, airo_error)
    app.add_middleware(Guard, settings=settings, routes=app.router.routes, pm=pm)
    return app


# Where each frontend points (README.md's table), by the adapter that serves it.
FRONTENDS = (
    ("kobold", "KoboldAI Lite", "AI &rarr; KoboldAI Remote API &rarr; <code>{base}</code>"),
    ("kobold", "SillyTavern, KoboldAI mode", "API URL <code>{base}/api</code>"),
    ("kobold", "SillyTavern, Text Completion mode (KoboldCpp or Default/Oobabooga type)",
     "server URL <code>{base}</code>"),
    ("textgen", "text-generation-webui API clients", "<code>{base}/api/v1/generate</code>, <code>{ws}/api/v1/stream</code>"),
    ("openai", "OpenAI SDKs", "<code>base_url=\"{base}/v1\"</code>"),
)


def index_page(request: Request, engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> str:
    """The page at `/`: the model served (masked without the API key, as the probes are), the demo model's warning,
    where to point each frontend, and the documentation."""
    esc = html.escape
    try:
        info = engine.model_info()
    except ModelNotLoaded:
        info = None
    if info is None:
        model = "<p><b>No model is loaded.</b></p>"
    elif not sees_names(request, settings):
        model = "<p>Model: <b>protected</b> (this server needs its API key).</p>"
    else:
        model = (f"<p>Model: <b id=\"model\">{esc(str(info.get('name')))}</b> &mdash; mix <b id=\"mix\">"
                 f"{esc(str(info.get('mix') or '?'))}</b>, context {esc(str(info.get('n_ctx')))} tokens, prompt "
                 f"template {esc(str(info.get('template')))}</p>")
        if is_demo_model(info.get("path")):
            model += f"<p id=\"demo-warning\" style=\"color:#b00\"><b>This is the {esc(BANNER)}</b></p>"
    base = str(request.base_url).rstrip("/")
    ws_port = settings.textgen_stream_port
    ws = (f"ws://{request.url.hostname}:{ws_port}" if ws_port and "textgen" in _enabled(pm)
          else base.replace("http", "ws", 1))
    rows = "".join(f"<tr><td>{name}</td><td>{where.format(base=esc(base), ws=esc(ws))}</td></tr>"
                   for adapter, name, where in FRONTENDS if adapter in _enabled(pm))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>airobackend</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}td{{padding:.3em .8em;
border-bottom:1px solid #ddd}}code{{background:#f4f4f4}}</style></head><body>
<h1>airobackend</h1>{model}
<h2>Connect a frontend</h2><table id="frontends"><tr><th>frontend</th><th>where to point it</th></tr>{rows}</table>
<h2>Documentation</h2><ul><li><a href="/docs">API documentation</a> (every route, tried from this page)</li>
<li><a href="/openapi.json">OpenAPI description</a></li></ul>
</body></html>"""


def _enabled(pm: pluggy.PluginManager) -> set[str]:
    return {name for name, plugin in pm.list_name_plugin() if plugin is not None}


# ---------------------------------------------------------------------------------------------- running

def uvicorn_config(app: Any, host: str, port: int, settings: Settings, **kw: Any):
    """uvicorn settings: h11 with bounded headers; WebSockets by the `websockets` package (its sans-I/O protocol,
    which uvicorn recommends over its deprecated legacy driver) with bounded frames and no server pings (like
    text-generation-webui's streaming server, which old clients expect)."""
    import uvicorn      # only to listen: the CLI imports this module to build every command's flags (start-up)

    return uvicorn.Config(
        app, host=host, port=port, ws="websockets-sansio", http="h11", lifespan="off",
        log_level="warning" if settings.quiet else "info", access_log=not settings.quiet,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, ws_max_size=int(settings.max_body_bytes),
        ws_ping_interval=None, timeout_graceful_shutdown=3,
        limit_concurrency=int(settings.max_connections) if settings.max_connections > 0 else None, **kw)


class PortInUse(OSError):
    """A port to listen on is taken; the message says which, and the flag that changes it."""


def listeners(app: Any, settings: Settings) -> list[tuple[str, int, str]]:
    """(host, port, how to change it) of every listener: the main one, then those the plugins' startup hooks add to
    app.state.extra_listeners as (host, port) or (host, port, how). Runs the startup hooks (once per app)."""
    if not getattr(app.state, "started_up", False):
        app.state.started_up = True
        app.state.pm.hook.startup(engine=app.state.engine, settings=settings, app=app)
    out = [(settings.host, int(settings.port), "choose another with --port N")]
    for entry in app.state.extra_listeners:
        host, port, *how = entry
        out.append((host, int(port), how[0] if how else "a plugin's listener"))
    return out


def _in_use(host: str, port: int, how: str) -> str:
    return f"port {port} on {host} is already in use (is another server running?); {how}"


def check_ports(app: Any, settings: Settings) -> None:
    """PortInUse for the first listener whose port is taken, so that `serve` stops before it loads a model."""
    for host, port, how in listeners(app, settings):
        if not _can_bind(host, port):
            raise PortInUse(_in_use(host, port, how))


async def serve_async(app: Any, settings: Settings, *, ready: Optional[Callable[[list], None]] = None) -> None:
    """Serve `app` on settings.host:settings.port plus every listener the plugins added, in one loop; `ready` gets
    the (host, port) pairs once all listen. PortInUse when the main port is taken; an extra port taken since
    `check_ports` is left out with a warning."""
    import uvicorn      # only to listen (see uvicorn_config)

    pm: pluggy.PluginManager = app.state.pm
    engine = app.state.engine
    try:
        (host, port, how), *extra = listeners(app, settings)
        if not _can_bind(host, port):     # uvicorn would exit with a traceback
            raise PortInUse(_in_use(host, port, how))
        bound = [(host, port)]
        for host, port, how in extra:
            if _can_bind(host, port):
                bound.append((host, port))
            else:  # taken since check_ports: an extra port must not stop the main server
                log.warning("cannot listen on %s:%s (in use; %s); serving without it", host, port, how)
        servers = [uvicorn.Server(uvicorn_config(app, h, p, settings)) for h, p in bound]
        app.state.servers = servers        # set `should_exit` on each to stop serving
        for s in servers:  # Ctrl-C handling is done once, by the caller
            s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):  # a port could not be bound
                break
            await asyncio.sleep(0.05)
        if ready is not None and all(s.started for s in servers):
            ready(bound)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        if not all(s.started for s in servers):
            raise OSError("could not listen on every port: " + ", ".join(f"{h}:{p}" for h, p in bound))
    finally:
        pm.hook.shutdown(engine=engine, settings=settings, app=app)


# ---------------------------------------------------------------------------------------------- adapter helpers

def build_request(pm: pluggy.PluginManager, protocol: str, payload: dict, settings: Settings, engine: EngineAPI, *,
                  prompt: Optional[str] = None, grammar: Optional[str] = None):
    """Ask the plugins to map `payload` of `protocol` to a GenerationRequest (one hook call per request); `prompt`
    and `grammar` are the route's own (hookspecs.build_generation_request)."""
    req = pm.hook.build_generation_request(protocol=protocol, payload=payload, settings=settings, engine=engine,
                                           prompt=prompt, grammar=grammar)
    if req is None:
        raise RequestError(f"no enabled adapter maps {protocol!r} requests")
    return req


def chat_prompt(pm: pluggy.PluginManager, engine: EngineAPI, messages: list[dict],
                tools: Optional[list[dict]] = None) -> str:
    """Render chat messages with a `format_chat_prompt` plugin if one answers, else the model's own template (which
    gets the `tools` too). Plugins see plain roles: tools and tool messages written out as llama.cpp does."""
    plain = polyfill_messages(messages, tools) if tools or has_tool_messages(messages) else messages
    prompt = pm.hook.format_chat_prompt(messages=plain, model_info=engine.model_info())
    if prompt is not None:
        return prompt
    return engine.format_chat(messages, tools=tools) if tools else engine.format_chat(messages)


def chat_stops(engine: EngineAPI) -> tuple[str, ...]:
    """Stop strings of the model's chat template (e.g. "USER:" for Airoboros), which end an assistant turn."""
    try:
        template = getattr(engine, "template", None)
        if template is None:
            from .chat import get_template      # start-up: see sampling_params
            template = get_template(str(engine.model_info()["template"]))
        return tuple(template.stop)
    except Exception:  # unknown template name, or no template information: EOS alone ends the turn
        return ()


def json_schema_body(example: dict, description: str = "") -> dict:
    """`openapi_extra` documenting a free-form JSON request body (bodies are parsed by hand for exact errors)."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}, "example": example}}}}


# ---------------------------------------------------------------------------------------------- sampler fields
# The three protocols share most sampler names (KoboldCpp accepts text-generation-webui's and llama.cpp's spellings,
# SillyTavern sends all of them at once), so one mapping serves every adapter; each passes its own defaults.

N_SAMPLERS = 7   # KoboldCpp sampler ids: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen


def sampler_order(value: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    """A KoboldCpp sampler_order: distinct ids 0..6 (at most 7 of them)."""
    if value is None:
        return default
    if (not isinstance(value, list) or not value or len(value) > N_SAMPLERS
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise FieldError(f"'sampler_order' must be a list of 1..{N_SAMPLERS} sampler ids", "sampler_order")
    bad = [i for i in value if not 0 <= i < N_SAMPLERS]
    if bad:
        raise FieldError(f"'sampler_order': unknown sampler id {bad[0]} (ids are 0..{N_SAMPLERS - 1})",
                         "sampler_order")
    if len(set(value)) != len(value):
        raise FieldError("'sampler_order' lists a sampler twice", "sampler_order")
    return tuple(value)


# text-generation-webui's sampler names (modules/sampler_hijack.py, `class_name_to_nickname` and the default
# `sampler_priority`, at oobabooga/text-generation-webui 1dcde41) -> the KoboldCpp sampler that does that work here.
# Several share a sampler: its place is that of the first of them in the list (top_p and min_p run together, as do
# temperature, dynamic temperature, quadratic sampling and top-nσ, and the three penalties).
TEXTGEN_SAMPLERS = {"repetition_penalty": 6, "presence_penalty": 6, "frequency_penalty": 6, "temperature": 5,
                    "dynamic_temperature": 5, "quadratic_sampling": 5, "top_n_sigma": 5, "top_k": 0, "top_p": 2,
                    "min_p": 2, "typical_p": 4, "tfs": 3, "top_a": 1}
# Named samplers whose place is fixed here (DRY first, XTC last, mirostat instead of the chain, as KoboldCpp runs
# them) or that this engine does not have: SillyTavern sends all of them in its default list, so they are accepted
# and give no place.
TEXTGEN_UNPLACED = ("dry", "xtc", "mirostat", "epsilon_cutoff", "eta_cutoff", "adaptive_p",
                    "encoder_repetition_penalty", "no_repeat_ngram")
MAX_PRIORITY_NAMES = 64


def textgen_sampler_order(payload: dict, base: tuple[int, ...]) -> tuple[int, ...]:
    """`base` reordered by text-generation-webui's `sampler_priority` and `temperature_last`.

    As text-generation-webui (modules/text_generation.py and sampler_hijack.py at 1dcde41): the priority is a list
    of names or one string of names separated by newlines or commas (empty: absent); samplers it does not name run
    first (here in `base`'s order); `temperature_last` moves the temperature step to the end. Every sampler runs,
    unlike a KoboldCpp `sampler_order` that leaves one out."""
    value = payload.get("sampler_priority")
    if isinstance(value, str):
        value = value.replace("\n", ",").split(",")
    if value is not None and (not isinstance(value, list) or not all(isinstance(x, str) for x in value)):
        raise FieldError("'sampler_priority' must be a list of sampler names or a string of them separated by "
                         "newlines or commas", "sampler_priority")
    names = [x.strip().lower() for x in value or () if x.strip()]
    if len(names) > MAX_PRIORITY_NAMES:
        raise FieldError(f"'sampler_priority' has {len(names)} names; at most {MAX_PRIORITY_NAMES} are allowed",
                         "sampler_priority")
    bad = [x for x in names if x not in TEXTGEN_SAMPLERS and x not in TEXTGEN_UNPLACED]
    if bad:
        raise FieldError(f"'sampler_priority': unknown sampler {bad[0][:40]!r} (known: "
                         f"{', '.join(list(TEXTGEN_SAMPLERS) + list(TEXTGEN_UNPLACED))})", "sampler_priority")
    order = list(base)
    if names:
        named = list(dict.fromkeys(TEXTGEN_SAMPLERS[x] for x in names if x in TEXTGEN_SAMPLERS))
        order = [i for i in range(N_SAMPLERS) if i not in named]
        order = sorted(order, key=lambda i: base.index(i) if i in base else N_SAMPLERS) + named
    if Fields(payload).bool("temperature_last", False):
        order = [i for i in order if i != 5] + [5]
    return tuple(order)


def token_id_list(text: Any, n_vocab: int, name: str = "custom_token_bans") -> tuple[int, ...]:
    """`custom_token_bans` (KoboldCpp, text-generation-webui): comma-separated token ids, or a list of ids."""
    parts = text if isinstance(text, list) else str(text).split(",")
    ids = []
    for part in parts:
        if isinstance(part, str):
            part = part.strip()
            if not part:
                continue
        try:
            if isinstance(part, bool):
                raise ValueError
            tid = int(part)
        except (TypeError, ValueError):
            raise FieldError(f"'{name}': {str(part)[:20]!r} is not a token id", name) from None
        ids.append(tid)
    check_token_ids(ids, n_vocab, name)
    return tuple(ids)


def string_list_field(value: Any, name: str, max_items: int) -> tuple[str, ...]:
    """A list of strings sent as a list, or as the JSON text of one (SillyTavern sends `dry_sequence_breakers` as
    '["\\n", ":"]'; text-generation-webui also without the brackets: '"\\n", ":"')."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if not text.startswith("["):
            text = "[" + text + "]"
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise FieldError(f"'{name}' must be a list of strings or its JSON text, got {text[:60]!r}", name) from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(f"'{name}' must be a list of strings", name)
    if len(value) > max_items:
        raise FieldError(f"'{name}' has {len(value)} entries; at most {max_items} are allowed", name)
    return tuple(v for v in value if v)


def sampling_params(payload: dict, n_vocab: int, *, textgen_order: bool = False, **defaults: Any):
    """SamplingParams from any protocol's sampler fields (all known aliases), `defaults` for absent ones;
    `textgen_order`: text-generation-webui's `sampler_priority` and `temperature_last` reorder the chain."""
    # Here, not at the top: the command line imports this module (through the adapters) to build its flags, and
    # the samplers, the grammar engine and the chat templates would add to every command's start.
    from .sampling import DRY_MAX_BREAKERS
    base = SamplingParams(**{k: v for k, v in defaults.items() if k in SamplingParams.__dataclass_fields__})
    f = Fields(payload)
    rep_pens = [(f.float(n, None), n) for n in ("rep_pen", "repetition_penalty", "repeat_penalty")]
    for value, name in rep_pens:
        if value is not None and value <= 0:
            raise FieldError(f"'{name}' must be > 0 (1.0 = no penalty)", name)
    rep_pen = max((r for r, _ in rep_pens if r is not None), default=base.repetition_penalty)  # KoboldCpp: largest
    mirostat = f.int(("mirostat", "mirostat_mode"), base.mirostat)
    if mirostat not in (0, 1, 2):
        raise FieldError("'mirostat' must be 0, 1 or 2", "mirostat")
    seed = f.int(("sampler_seed", "seed"), -1 if base.seed is None else base.seed, hi=2**64 - 1)
    temperature = f.float("temperature", base.temperature, lo=0.0, clamp=True)   # <= 0 means greedy
    if not f.bool("do_sample", True):                                            # text-generation-webui
        temperature = 0.0
    dyn_range = f.float("dynatemp_range", base.dynatemp_range, lo=0.0, clamp=True)
    if f.bool("dynamic_temperature", False):   # text-generation-webui/SillyTavern: [low, high] around the middle
        low = f.float("dynatemp_low", temperature, lo=0.0, clamp=True)
        high = f.float("dynatemp_high", temperature, lo=low, clamp=True)
        temperature, dyn_range = (low + high) / 2, (high - low) / 2
    if f.has("ban_eos_token", "ignore_eos"):
        ban_eos = f.bool(("ban_eos_token", "ignore_eos"), False)
    else:
        ban_eos = f.bool("use_default_badwordsids", base.ban_eos)
    bans = payload.get("custom_token_bans")
    order = sampler_order(payload.get("sampler_order"), base.sampler_order or DEFAULT_SAMPLER_ORDER)
    breakers = payload.get("dry_sequence_breakers")
    return base.replace(
        temperature=temperature,
        top_k=min(f.int("top_k", base.top_k, lo=0, clamp=True), n_vocab),
        top_p=f.float("top_p", base.top_p, lo=0.0, hi=1.0, clamp=True),
        min_p=f.float("min_p", base.min_p, lo=0.0, hi=1.0, clamp=True),
        typical_p=f.float(("typical", "typical_p"), base.typical_p, lo=0.0, hi=1.0, clamp=True),
        tfs=f.float(("tfs", "tfs_z"), base.tfs, lo=0.0, hi=1.0, clamp=True),
        top_a=f.float("top_a", base.top_a, lo=0.0, clamp=True),
        repetition_penalty=rep_pen,
        repetition_penalty_range=f.int(("rep_pen_range", "repetition_penalty_range", "repeat_last_n",
                                        "penalty_last_n"), base.repetition_penalty_range, lo=0, clamp=True),
        repetition_penalty_slope=f.float("rep_pen_slope", base.repetition_penalty_slope, lo=0.0, clamp=True),
        presence_penalty=f.float(("presence_penalty", "presence_pen"), base.presence_penalty, lo=-100, hi=100),
        frequency_penalty=f.float(("frequency_penalty", "frequency_pen"), base.frequency_penalty, lo=-100, hi=100),
        mirostat=mirostat,
        mirostat_tau=f.float("mirostat_tau", base.mirostat_tau, lo=0.0),
        mirostat_eta=f.float("mirostat_eta", base.mirostat_eta, lo=0.0),
        dynatemp_range=dyn_range,
        dynatemp_exponent=f.float("dynatemp_exponent", base.dynatemp_exponent, lo=0.0),
        smoothing_factor=f.float("smoothing_factor", base.smoothing_factor, lo=0.0, hi=1000.0),
        smoothing_curve=f.float("smoothing_curve", base.smoothing_curve, lo=1.0, hi=10.0),
        nsigma=f.float(("nsigma", "top_n_sigma"), base.nsigma, lo=-100.0, hi=100.0),
        xtc_threshold=f.float("xtc_threshold", base.xtc_threshold, lo=0.0, hi=1.0),
        xtc_probability=f.float("xtc_probability", base.xtc_probability, lo=0.0, hi=1.0),
        dry_multiplier=f.float("dry_multiplier", base.dry_multiplier, lo=0.0, hi=100.0),
        dry_base=f.float("dry_base", base.dry_base, lo=0.0, hi=100.0),
        dry_allowed_length=f.int("dry_allowed_length", base.dry_allowed_length, lo=0, hi=1 << 24),
        dry_penalty_last_n=f.int("dry_penalty_last_n", base.dry_penalty_last_n, lo=-1, hi=1 << 24),
        dry_sequence_breakers=(string_list_field(breakers, "dry_sequence_breakers", DRY_MAX_BREAKERS)
                               if breakers is not None else base.dry_sequence_breakers),
        sampler_order=textgen_sampler_order(payload, order) if textgen_order else order,
        seed=None if seed < 0 else seed,
        logit_bias=f.logit_bias("logit_bias", n_vocab),
        banned_tokens=token_id_list(bans, n_vocab) if bans is not None else base.banned_tokens,
        banned_strings=f.str_list(("banned_tokens", "banned_strings"), base.banned_strings, max_items=1024)[:48],
        ban_eos=ban_eos,
        grammar=f.str(("grammar", "grammar_string"), "") or base.grammar,
    )


def _can_bind(host: str, port: int) -> bool:
    """Whether (host, port) is free to listen on (checked the way uvicorn binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
