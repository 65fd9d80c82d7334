"""text-generation-webui's legacy API (`extensions/api` at 6a7cd01, the last commit before its removal, November 2023).

Scripts, bots and libraries written for it still hard-code it: blocking `/api/v1/generate`, `/api/v1/chat`,
`/api/v1/model` (GET, and POST actions list/info/load/unload), `/api/v1/token-count`, `/api/v1/stop-stream`, and the
streaming WebSockets `/api/v1/stream` and `/api/v1/chat-stream` (`text_stream` ... `stream_end` events), which old
clients expect on a second port, 5005 (`--textgen-stream-port`, 0 disables it).

GET /api/v1/model and POST /api/v1/generate are KoboldAI routes too. When the kobold adapter is enabled its handlers
serve both kinds of client (it hands text-generation-webui bodies back to this module's mapping through the
`build_generation_request` hook); these handlers answer when it is disabled.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
from typing import Any, Optional

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from airobackend.aio import GenerationStream, collect
from airobackend.errors import AiroError, ModelNotLoaded
from airobackend.hookspecs import hookimpl
from airobackend.manager import option_flag, option_number, parse_load_options, renamed
from airobackend.server import (ADMIN_ACTIONS, FieldError, Fields, build_request, chat_prompt, chat_stops,
                                json_schema_body, loaded_model_name, read_json, require_admin,
                                run_watching_disconnect, sampling_params, sees_names)
from airobackend.settings import Settings
from airobackend.types import EngineAPI, GenerationRequest, is_model_library

log = logging.getLogger("airobackend.adapters.textgen")

# text-generation-webui's defaults for absent fields (`build_parameters` in `extensions/api/util.py` at 6a7cd01)
TEXTGEN_DEFAULTS = dict(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                        repetition_penalty=1.1, repetition_penalty_range=0, repetition_penalty_slope=1.0,
                        presence_penalty=0.0, frequency_penalty=0.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1,
                        seed=None, ban_eos=False, xtc_threshold=0.1,
                        dry_sequence_breakers=("\n", ":", "\"", "*"))
MAX_NEW_TOKENS = 200
# Requests a client may send ahead of their answers on one socket (its clients send one and wait for stream_end).
# Together with a byte bound (one body's worth) this keeps a client from piling up memory faster than it is served.
MAX_PENDING_MESSAGES = 8

GENERATE_EXAMPLE = {"prompt": "USER: Hello! ASSISTANT:", "max_new_tokens": 64, "temperature": 0.7,
                    "stopping_strings": ["USER:"]}
CHAT_EXAMPLE = {"user_input": "Hello!", "history": {"internal": [], "visible": []}, "mode": "instruct",
                "max_new_tokens": 64}


# ---------------------------------------------------------------------------------------------- request mapping

def to_generation_request(payload: dict, *, n_ctx: int, n_vocab: int,
                          prompt: Optional[str] = None) -> GenerationRequest:
    """Map a text-generation-webui generate body to a GenerationRequest with its defaults: stop strings are cut
    from the output, `max_new_tokens` 200, temperature 0.5, repetition penalty 1.1 over the whole context."""
    f = Fields(payload)
    if prompt is None:
        prompt = f.str("prompt", "")
    max_new = f.int(("max_new_tokens", "max_length"), MAX_NEW_TOKENS, lo=0)
    if f.bool("auto_max_new_tokens", False):
        max_new = -1                      # until EOS or the context is full
    else:
        max_new = min(max_new, n_ctx)
    sampling = sampling_params(payload, n_vocab, textgen_order=True, **TEXTGEN_DEFAULTS)
    if not f.has("dry_penalty_last_n"):      # text-generation-webui's DRY looks back over repetition_penalty_range
        sampling = sampling.replace(dry_penalty_last_n=sampling.repetition_penalty_range)
    return GenerationRequest(
        prompt=prompt,
        max_tokens=max_new,
        stop=f.str_list(("stopping_strings", "custom_stopping_strings", "stop"), max_items=1024)[:32],
        trim_stop=True,
        add_bos=f.bool("add_bos_token", True),
        render_special=not f.bool("skip_special_tokens", True),
        sampling=sampling,
        genkey=f.str("genkey", "") or None,
    )


def chat_turns(payload: dict) -> tuple[str, list[list[str]], list[list[str]], bool, bool]:
    """(user_input, internal history, visible history, regenerate, continue) from a chat body."""
    f = Fields(payload)
    user_input = f.str(("user_input", "text"), None)
    history = payload.get("history") or {}
    if not isinstance(history, dict):
        raise FieldError("'history' must be an object with 'internal' and 'visible' lists", "history")
    pairs = {}
    for key in ("internal", "visible"):
        rows = history.get(key) or []
        if (not isinstance(rows, list) or
                not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in rows)):
            raise FieldError(f"'history.{key}' must be a list of [user, bot] string pairs", "history")
        pairs[key] = [list(r) for r in rows]
    internal, visible = pairs["internal"], pairs["visible"]
    if len(visible) != len(internal):
        visible = [[html.escape(u), html.escape(b)] for u, b in internal]
    regenerate = f.bool("regenerate", False)
    cont = f.bool(("_continue", "continue_"), False)
    if (regenerate or cont) and not internal:
        raise FieldError("'regenerate' and '_continue' need a non-empty history", "history")
    if user_input is None and not (regenerate or cont):
        raise FieldError("'user_input' is required", "user_input")
    return user_input or "", internal, visible, regenerate, cont


def chat_messages(payload: dict, internal: list[list[str]], user_input: str) -> list[dict]:
    f = Fields(payload)
    messages = []
    context = f.str(("context", "context_instruct"), "")
    if context:
        messages.append({"role": "system", "content": context})
    for u, b in internal:
        messages.append({"role": "user", "content": u})
        messages.append({"role": "assistant", "content": b})
    messages.append({"role": "user", "content": user_input})
    return messages


def _cache_bits(kind: str):
    return lambda value, where: {"cache_type_k": kind, "cache_type_v": kind} if option_flag(value, where) else {}


# text-generation-webui's names in a load's `args` (its llama.cpp loaders' options, `modules/loaders.py`) -> ours
TEXTGEN_LOAD_SPELLINGS = {
    "max_seq_len": renamed("n_ctx"),
    "threads": renamed("n_threads"),
    "instruction_template": renamed("template"),
    "no_mmap": lambda value, where: {"use_mmap": not option_flag(value, where)},
    # linear RoPE scaling as a compression factor: rope_freq_scale = 1 / compress_pos_emb
    "compress_pos_emb": lambda value, where: {"rope_freq_scale": 1.0 / option_number(value, where, 1.0, 1e3)},
    "cache_type": lambda value, where: {"cache_type_k": value, "cache_type_v": value},      # fp16 | q8_0 | q4_0
    "cache_8bit": _cache_bits("q8_0"),                                                     # its older flags
    "cache_4bit": _cache_bits("q4_0"),
}


def load_options(args: Any, param: str = "args") -> dict:
    """A text-generation-webui load's `args` (threads, n_ctx, no_mmap, compress_pos_emb, ...) as load() options (the
    manager owns what a load may change)."""
    return parse_load_options(args, param, TEXTGEN_LOAD_SPELLINGS)


# ---------------------------------------------------------------------------------------------- plugin hooks

@hookimpl
def build_generation_request(protocol: str, payload: dict, engine: EngineAPI,
                             prompt: Optional[str]) -> Optional[GenerationRequest]:
    if protocol not in ("textgen", "textgen.chat"):
        return None
    info = engine.model_info()
    return to_generation_request(payload, n_ctx=int(info["n_ctx"]), n_vocab=int(info["n_vocab"]),
                                 prompt=prompt if protocol == "textgen.chat" else None)


@hookimpl
def register_routes(engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> APIRouter:
    return TextgenRoutes(engine, settings, pm).router


@hookimpl
def startup(settings: Settings, app: Any) -> None:
    port = settings.textgen_stream_port
    if port and int(port) != int(settings.port):
        app.state.extra_listeners.append((settings.host, int(port), "it serves text-generation-webui's streaming "
                                          "WebSocket: choose another with --textgen-stream-port N, or 0 for none"))


@hookimpl
def add_cli_arguments(parser: Any) -> None:
    parser.add_argument("--textgen-stream-port", type=int, default=None, metavar="PORT",
                        help="second port serving text-generation-webui's streaming WebSocket, as its old API did "
                             "(default 5005; 0 disables; env AIRO_TEXTGEN_STREAM_PORT)")


class TextgenRoutes:
    def __init__(self, engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.engine, self.settings, self.pm = engine, settings, pm
        r = self.router = APIRouter(tags=["text-generation-webui (legacy API)"])
        r.add_api_route("/api/v1/model", self.model_get, methods=["GET"], response_model=None, summary="Loaded model name")
        r.add_api_route("/api/v1/generate", self.generate, methods=["POST"], response_model=None, summary="Generate (blocking)",
                        openapi_extra=json_schema_body(GENERATE_EXAMPLE, "text-generation-webui generate body"))
        r.add_api_route("/api/v1/chat", self.chat, methods=["POST"], response_model=None, summary="Chat turn (blocking)",
                        openapi_extra=json_schema_body(CHAT_EXAMPLE, "text-generation-webui chat body"))
        r.add_api_route("/api/v1/model", self.model_post, methods=["POST"], response_model=None,
                        summary="Model actions: list, info, load (admin), unload (admin)",
                        openapi_extra={**json_schema_body({"action": "info"}, "{action, model_name, args}"),
                                       ADMIN_ACTIONS: ["load", "unload"]})
        r.add_api_route("/api/v1/token-count", self.token_count, methods=["POST"], response_model=None, summary="Count tokens")
        r.add_api_route("/api/v1/stop-stream", self.stop_stream, methods=["POST"], response_model=None, summary="Abort generation")
        r.add_api_websocket_route("/api/v1/stream", self.ws_stream)
        r.add_api_websocket_route("/api/v1/chat-stream", self.ws_chat_stream)

    # -- model
    def _name(self, request: Any) -> str:
        if not sees_names(request, self.settings):
            return "protected-model"
        return loaded_model_name(self.engine) or "None"     # text-generation-webui's "nothing loaded"

    def _info(self, request: Any) -> dict:
        try:
            info = self.engine.model_info()
            n_ctx = int(info["n_ctx"])
        except ModelNotLoaded:
            info, n_ctx = {}, int(self.settings.n_ctx)
        return {"model_name": self._name(request), "lora_names": [],
                "shared.settings": {"truncation_length": n_ctx, "max_new_tokens": MAX_NEW_TOKENS,
                                    "instruction_template": info.get("template")},
                "shared.args": {"n_ctx": n_ctx, "threads": self.settings.n_threads, "n_batch": self.settings.n_batch,
                                "loader": "airobackend", "rope_freq_base": info.get("rope_freq_base"),
                                "compress_pos_emb": 1.0 / float(info.get("rope_freq_scale") or 1.0)}}

    async def model_get(self, request: Request) -> dict:
        return {"result": self._name(request)}

    def _manager(self, method: str) -> Any:
        """The ModelManager method if the server runs one (looked up on the class: no delegation magic)."""
        return getattr(self.engine, method) if is_model_library(self.engine) else None

    async def model_post(self, request: Request) -> JSONResponse:
        body = await read_json(request, allow_empty=True)
        f = Fields(body)
        action = f.str("action", "")
        if action == "info":
            return JSONResponse({"result": self._info(request)})
        if action not in ("list", "load", "unload"):
            return JSONResponse({"result": self._name(request)})
        if action in ("load", "unload"):
            require_admin(request)
        fn = self._manager({"list": "list_models", "load": "load", "unload": "unload"}[action])
        if fn is None:
            return JSONResponse({"error": {"message": f"'{action}' is not available: this server runs a single "
                                                      f"model without a model library"}})
        try:
            if action == "list":
                models = await run_in_threadpool(fn)
                return JSONResponse({"result": ["None"] + [str(m["name"]) for m in models]})
            if action == "load":
                name = f.str("model_name", "")
                if not name:
                    raise FieldError("'model_name' is required to load a model", "model_name")
                overrides = load_options(body.get("args"))
                await run_in_threadpool(lambda: fn(name, **overrides))
            else:
                await run_in_threadpool(fn)
        except AiroError as e:     # text-generation-webui answers 200 with an error object here
            return JSONResponse({"error": {"message": f"{type(e).__name__}: {e}"}})
        return JSONResponse({"result": self._info(request)})

    # -- generation
    async def generate(self, request: Request) -> dict:
        body = await read_json(request)
        stream = GenerationStream(self.engine, build_request(self.pm, "textgen", body, self.settings, self.engine))

        text, _ = await run_watching_disconnect(request, collect(stream), stream.cancel)
        return {"results": [{"text": text}]}

    def _chat_request(self, body: dict) -> tuple[GenerationRequest, str, list, list, bool, str]:
        user_input, internal, visible, regenerate, cont = chat_turns(body)
        prefix = ""
        if regenerate:
            user_input = internal[-1][0]
            internal, visible = internal[:-1], visible[:-1]
        elif cont:
            user_input, prefix = internal[-1]
            internal, visible = internal[:-1], visible[:-1]
        prompt = chat_prompt(self.pm, self.engine, chat_messages(body, internal, user_input)) + prefix
        req = build_request(self.pm, "textgen.chat", body, self.settings, self.engine, prompt=prompt)
        req.stop = tuple(dict.fromkeys(tuple(req.stop) + chat_stops(self.engine)))
        return req, user_input, internal, visible, cont, prefix

    @staticmethod
    def _history(user_input: str, internal: list, visible: list, reply: str) -> dict:
        return {"internal": internal + [[user_input, reply]],
                "visible": visible + [[html.escape(user_input), html.escape(reply)]]}

    async def chat(self, request: Request) -> dict:
        body = await read_json(request)
        req, user_input, internal, visible, _, prefix = self._chat_request(body)
        stream = GenerationStream(self.engine, req)

        text, _ = await run_watching_disconnect(request, collect(stream), stream.cancel)
        return {"results": [{"history": self._history(user_input, internal, visible, prefix + text)}]}

    async def token_count(self, request: Request) -> dict:
        body = await read_json(request)
        ids = await run_in_threadpool(self.engine.tokenize, Fields(body).str("prompt", ""), True)
        return {"results": [{"tokens": len(ids)}]}

    async def stop_stream(self, request: Request) -> dict:
        await read_json(request, allow_empty=True)
        self.engine.abort(None)
        return {"results": "success"}

    # -- WebSockets
    async def ws_stream(self, websocket: WebSocket) -> None:
        await self._ws(websocket, chat=False)

    async def ws_chat_stream(self, websocket: WebSocket) -> None:
        await self._ws(websocket, chat=True)

    async def _ws(self, websocket: WebSocket, chat: bool) -> None:
        """One JSON request per text message, answered by text_stream events and a stream_end, in order; a
        client that goes away aborts the generation it is waiting for."""
        await websocket.accept()
        inbox: asyncio.Queue = asyncio.Queue()
        current: list[GenerationStream] = []
        pending = [0]                  # characters waiting in the inbox

        async def read() -> None:
            try:
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    data = msg.get("text")
                    if data is None:
                        data = (msg.get("bytes") or b"").decode("utf-8", errors="replace")
                    if inbox.qsize() >= MAX_PENDING_MESSAGES or \
                            pending[0] + len(data) > int(self.settings.max_body_bytes):
                        log.warning("a WebSocket client sent too many requests ahead of their answers; closing it")
                        await websocket.close(code=1008, reason="too many requests sent ahead of their answers")
                        break
                    pending[0] += len(data)
                    await inbox.put(data)
            finally:
                for gs in current:
                    gs.cancel()
                while not inbox.empty():   # the client is gone: nobody waits for answers to what it sent ahead
                    inbox.get_nowait()
                await inbox.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                data = await inbox.get()
                if data is None:
                    break
                pending[0] -= len(data)
                if not await self._ws_one(websocket, data, chat, current):
                    break
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            for gs in current:
                gs.cancel()
            reader.cancel()
            if websocket.application_state == WebSocketState.CONNECTED and \
                    websocket.client_state == WebSocketState.CONNECTED:
                try:
                    await websocket.close()
                except Exception:
                    pass

    async def _ws_one(self, websocket: WebSocket, data: str, chat: bool, current: list) -> bool:
        """Answer one request message; False when the client is gone."""
        n = 0
        try:
            try:
                body = json.loads(data, parse_constant=lambda c: (_ for _ in ()).throw(
                    FieldError(f"invalid JSON number {c!r}")))
            except json.JSONDecodeError as e:
                raise FieldError(f"invalid JSON ({e.msg})") from None
            if not isinstance(body, dict):
                raise FieldError("a request must be a JSON object")
            if chat:
                req, user_input, internal, visible, _, prefix = self._chat_request(body)
            else:
                req = build_request(self.pm, "textgen", body, self.settings, self.engine)
            gs = GenerationStream(self.engine, req)
            current.append(gs)
            try:
                await gs.start()
                reply = prefix if chat else ""
                async for ev in gs:
                    if ev.text or (n == 0 and ev.finish_reason is None):
                        reply += ev.text
                        out = ({"event": "text_stream", "message_num": n,
                                "history": self._history(user_input, internal, visible, reply)} if chat
                               else {"event": "text_stream", "message_num": n, "text": ev.text})
                        await websocket.send_text(json.dumps(out))
                        n += 1
                    if ev.finish_reason is not None:
                        break
            finally:
                await gs.aclose()
                current.remove(gs)
        except (WebSocketDisconnect, OSError):
            return False
        except Exception as e:   # bad request or engine refusal: tell the client, end this request, keep the socket
            if not isinstance(e, AiroError):
                log.exception("WebSocket request failed")
            try:
                await websocket.send_text(json.dumps({"event": "error", "message_num": n,
                                                      "message": str(e) or type(e).__name__}))
                n += 1
            except Exception:
                return False
        try:
            await websocket.send_text(json.dumps({"event": "stream_end", "message_num": n}))
        except Exception:
            return False
        return True
