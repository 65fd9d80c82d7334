"""OpenAI-compatible API plus text-generation-webui's /v1/internal routes (its `extensions/openai` at commit 3013758).

Serves the `openai` SDK, SillyTavern's "Text Completion" modes (KoboldCpp and Default/Oobabooga), LoLLMS' vLLM and
litellm bindings and lollms-client. Streams are `data: <json>\\n\\n` chunks ending with a terminated
`data: [DONE]\\n\\n`; errors use OpenAI's envelope {"error": {message, type, param, code}}. Sampler fields of KoboldCpp
and text-generation-webui are accepted beside OpenAI's, since SillyTavern sends all of them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Optional

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from airobackend.aio import FAILED, PING, GenerationStream, collect, live_events
from airobackend.embeddings import embeddings_response
from airobackend.errors import ModelNotLoaded, check_token_ids
from airobackend.hookspecs import hookimpl
from airobackend.json_schema import response_format_schema, schema_to_grammar
from airobackend.openai_shapes import (ChatDeltas, CompletionDeltas, Envelope, chat_choice, chat_logprobs,
                                       completion_choice, completion_logprobs, finish_reason, usage_of)
from airobackend.tools import ToolSpec, answer_message, parse_tools
from airobackend.server import (ErrorInfo, FieldError, Fields, build_request, chat_prompt, chat_stops,
                                json_schema_body, llama_timings, loaded_model_name, read_json,
                                run_watching_disconnect, sampling_params, sees_names)
from airobackend.settings import Settings
from airobackend.sse import DONE, SSEResponse, encode_sse
from airobackend.types import EngineAPI, GenerationEvent, GenerationRequest, is_model_library

log = logging.getLogger("airobackend.adapters.openai")

# OpenAI's documented defaults for absent fields; samplers OpenAI does not have are off.
OPENAI_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                       repetition_penalty=1.0, repetition_penalty_range=0, repetition_penalty_slope=1.0,
                       presence_penalty=0.0, frequency_penalty=0.0, mirostat=0, seed=None, ban_eos=False)
COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512           # OpenAI: "until the context is full"; text-generation-webui uses 512
MAX_STOPS = 32
MAX_CHOICES = 8
ROLES = ("system", "user", "assistant", "tool", "function", "developer")

COMPLETION_EXAMPLE = {"model": "any", "prompt": "USER: Hello! ASSISTANT:", "max_tokens": 32, "temperature": 0.7,
                      "stop": ["USER:"], "stream": False}
CHAT_EXAMPLE = {"model": "any", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64,
                "stream": False}


# ---------------------------------------------------------------------------------------------- request mapping

def to_generation_request(payload: dict, *, n_ctx: int, n_vocab: int, chat: bool,
                          prompt: Optional[str] = None, grammar: Optional[str] = None) -> GenerationRequest:
    """Map an OpenAI completions/chat body to a GenerationRequest. For chat, `prompt` is the rendered messages;
    for completions the body's `prompt` (a string, one-string list, or a list of token ids) is used. `grammar`: one
    the route requires (tool calls), else the body's structured-output fields make it."""
    f = Fields(payload)
    tokens = None
    if not chat:
        prompt, tokens = completion_prompt(payload.get("prompt"), n_vocab)
    default_max = CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS
    names = ("max_completion_tokens", "max_tokens", "max_new_tokens") if chat else ("max_tokens", "max_new_tokens")
    max_tokens = f.int(names, default_max, lo=-1)
    if max_tokens == -1 or max_tokens > n_ctx:        # -1: llama.cpp's "until the context is full"
        max_tokens = n_ctx
    n_probs = 0
    if chat:
        if f.bool("logprobs", False):
            n_probs = max(1, top_logprobs(payload))
    else:
        n_probs = f.int("logprobs", 0, lo=0, hi=20)
    sampling = sampling_params(payload, n_vocab, textgen_order=True, **OPENAI_DEFAULTS)
    structured = grammar or structured_grammar(payload)
    if structured:
        if sampling.grammar:
            raise FieldError("'grammar' cannot be combined with 'response_format', 'json_schema' or 'tools'",
                             "grammar")
        sampling = sampling.replace(grammar=structured)
    return GenerationRequest(
        prompt=prompt if tokens is None else None,
        tokens=tokens,
        max_tokens=max_tokens,
        stop=f.str_list(("stop", "stopping_strings"), max_items=1024)[:MAX_STOPS],
        trim_stop=True,
        add_bos=f.bool("add_bos_token", True),
        render_special=not f.bool("skip_special_tokens", True),     # text-generation-webui's field
        sampling=sampling,
        echo=False if chat else f.bool("echo", False),
        n_probs=n_probs,
        genkey=f.str("genkey", "") or None,
    )


def response_schema(payload: dict) -> Optional[Any]:
    """The JSON schema the answer must follow: OpenAI's `response_format`, or llama.cpp's `json_schema` field."""
    schema = response_format_schema(payload.get("response_format"))
    if payload.get("json_schema") is not None:
        if schema is not None:
            raise FieldError("give 'response_format' or 'json_schema', not both", "json_schema")
        schema = payload["json_schema"]
    return schema


def structured_grammar(payload: dict) -> Optional[str]:
    """The grammar that makes the answer JSON valid against `response_schema(payload)`, if one is asked for."""
    schema = response_schema(payload)
    if schema is None:
        return None
    return schema_to_grammar(schema, param="response_format" if payload.get("response_format") else "json_schema")


def completion_prompt(value: Any, n_vocab: int) -> tuple[Optional[str], Optional[list[int]]]:
    """OpenAI `prompt`: a string, a list with one string, or token ids (a list of ints / one such list)."""
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return completion_prompt(value[0], n_vocab)
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None, check_token_ids(list(value), n_vocab, "prompt")
    raise FieldError("'prompt' must be a string, a list with one string, or a list of token ids", "prompt")


def chat_messages(payload: dict) -> list[dict]:
    """Validate `messages`; text parts of multi-part contents are joined (images are not supported). An assistant
    message keeps its `tool_calls`, a tool message its `tool_call_id` and `name` (the template renders them)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError(f"'messages[{i}]' must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise FieldError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                    raise FieldError(f"'messages[{i}].content' parts must be objects with a type", "messages")
                if p["type"] == "text":
                    if not isinstance(p.get("text"), str):
                        raise FieldError(f"'messages[{i}].content' text part needs a string 'text'", "messages")
                    parts.append(p["text"])
            content = "\n".join(parts)
        elif not isinstance(content, str):
            raise FieldError(f"'messages[{i}].content' must be a string or a list of parts", "messages")
        msg = {"role": "system" if role == "developer" else "tool" if role == "function" else role,
               "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = message_tool_calls(m["tool_calls"], i)
        if role in ("tool", "function"):
            for k in ("tool_call_id", "name"):
                if m.get(k) is not None:
                    if not isinstance(m[k], str):
                        raise FieldError(f"'messages[{i}].{k}' must be a string", "messages")
                    msg[k] = m[k]
        out.append(msg)
    return out


def message_tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's `tool_calls`, checked: [{"id", "type": "function", "function": {name, arguments}}]."""
    if not isinstance(calls, list):
        raise FieldError(f"'messages[{i}].tool_calls' must be a list", "messages")
    out = []
    for j, tc in enumerate(calls):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", ""), (str, dict)) or tc.get("type", "function") != "function":
            raise FieldError(f"'messages[{i}].tool_calls[{j}]' must be {{\"type\": \"function\", \"function\": "
                             f"{{\"name\", \"arguments\"}}}}", "messages")
        out.append({"id": str(tc.get("id") or ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "")}})
    return out






def _escaped(token: str) -> str:
    """text-generation-webui's logits keys: control characters (C0, DEL, C1) written as Python escapes."""
    return "".join(repr(c)[1:-1] if ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F else c for c in token)








def top_logprobs(body: dict) -> int:
    """Chat's `top_logprobs` (0-20): the engine is asked for at least one, so that `logprobs: true` alone works."""
    return Fields(body).int("top_logprobs", 0, lo=0, hi=20)


# ---------------------------------------------------------------------------------------------- plugin hooks

@hookimpl
def build_generation_request(protocol: str, payload: dict, engine: EngineAPI, prompt: Optional[str],
                             grammar: Optional[str]) -> Optional[GenerationRequest]:
    if protocol not in ("openai.completions", "openai.chat"):
        return None
    info = engine.model_info()
    chat = protocol == "openai.chat"
    return to_generation_request(payload, n_ctx=int(info["n_ctx"]), n_vocab=int(info["n_vocab"]), chat=chat,
                                 prompt=prompt if chat else None, grammar=grammar)


@hookimpl
def register_routes(engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> APIRouter:
    return OpenAIRoutes(engine, settings, pm).router


def is_openai_path(path: str) -> bool:
    """The paths whose errors take OpenAI's shape: everything under /v1 (text-generation-webui's /v1/internal too)."""
    return path == "/v1" or path.startswith("/v1/")


# error kind -> (OpenAI error type, code), as llama.cpp's server and OpenAI name them
OPENAI_ERRORS = {
    "missing_key": ("authentication_error", "invalid_api_key"),
    "unauthorized": ("authentication_error", "invalid_api_key"),
    "forbidden": ("permission_error", "origin_not_allowed"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "busy": ("unavailable_error", "server_busy"),
    "not_loaded": ("unavailable_error", "model_not_loaded"),
    "backend_unavailable": ("unavailable_error", "backend_unavailable"),
    "context_length": ("invalid_request_error", "context_length_exceeded"),
    "bad_request": ("invalid_request_error", None),
    "not_found": ("not_found_error", None),
    "method_not_allowed": ("invalid_request_error", None),
    "server_error": ("server_error", None),
}


@hookimpl
def error_response(path: str, error: ErrorInfo) -> Optional[JSONResponse]:
    """OpenAI's error envelope {"error": {message, type, param, code}} on /v1 paths."""
    if not is_openai_path(path):
        return None
    type_, code = OPENAI_ERRORS.get(error.kind, ("server_error", None))
    message = "Invalid API Key" if error.kind == "missing_key" else error.message     # llama.cpp's words
    return JSONResponse({"error": {"message": message, "type": type_, "param": error.param, "code": code}},
                        status_code=error.status)


class OpenAIRoutes:
    def __init__(self, engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.engine, self.settings, self.pm = engine, settings, pm
        self.created = int(time.time())
        r = self.router = APIRouter(tags=["OpenAI"])
        r.add_api_route("/v1/models", self.models, methods=["GET"], response_model=None, summary="The served model")
        r.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"], response_model=None, summary="One model")
        r.add_api_route("/v1/completions", self.completions, methods=["POST"], response_model=None, summary="Text completion",
                        openapi_extra=json_schema_body(COMPLETION_EXAMPLE, "OpenAI completion request"))
        r.add_api_route("/v1/completion", self.completions, methods=["POST"], response_model=None, include_in_schema=False)
        r.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], response_model=None, summary="Chat completion",
                        openapi_extra=json_schema_body(CHAT_EXAMPLE, "OpenAI chat completion request"))
        r.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"], response_model=None,
                        summary="Embeddings (mean-pooled, normalised hidden states of the loaded model)",
                        openapi_extra=json_schema_body({"model": "any", "input": ["first text", "second text"],
                                                        "encoding_format": "float"}, "OpenAI embeddings request"))
        r = APIRouter(tags=["text-generation-webui internal"])
        r.add_api_route("/v1/internal/encode", self.encode, methods=["POST"], response_model=None, summary="Tokenize {text}")
        r.add_api_route("/v1/internal/decode", self.decode, methods=["POST"], response_model=None, summary="Detokenize {tokens}")
        r.add_api_route("/v1/internal/token-count", self.token_count, methods=["POST"], response_model=None, summary="Count tokens")
        r.add_api_route("/v1/internal/logits", self.logits, methods=["POST"], response_model=None,
                        summary="The most likely next tokens and their probabilities",
                        openapi_extra=json_schema_body({"prompt": "Who is best, Asuka or Rei? Answer:",
                                                        "use_samplers": False, "top_logits": 10},
                                                       "text-generation-webui logits request"))
        r.add_api_route("/v1/internal/model/info", self.model_info, methods=["GET"], response_model=None, summary="Loaded model")
        r.add_api_route("/v1/internal/stop-generation", self.stop_generation, methods=["POST"], response_model=None,
                        summary="Abort the running generation")
        self.router.routes.extend(r.routes)

    # -- models
    def _model_id(self, request: Request) -> str:
        if not sees_names(request, self.settings):
            return "protected-model"
        return loaded_model_name(self.engine) or "none"

    def _model_entry(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "airobackend",
                "permission": [], "root": model_id, "parent": None}

    def _library(self, request: Request) -> list[str]:
        """Names of the other loadable models of the library (a ModelManager's list_models), for /v1/models."""
        if not sees_names(request, self.settings):
            return []                                   # masked, like the served model's name
        if not is_model_library(self.engine):
            return []
        return [str(m["name"]) for m in self.engine.list_models() if not m.get("loaded")]

    def _meta(self) -> Optional[dict]:
        """llama.cpp's `meta` of the served model: context, trained context and the RoPE values it runs with."""
        try:
            info = self.engine.model_info()
        except ModelNotLoaded:
            return None
        return {k: info.get(k) for k in ("n_ctx", "n_ctx_train", "n_vocab", "rope_freq_base", "rope_freq_scale",
                                         "rope_scaling")}

    async def models(self, request: Request) -> dict:
        """The served model first, then the rest of the model library (switch with /v1/internal/model/load)."""
        names = await run_in_threadpool(self._library, request)
        served = self._model_entry(self._model_id(request))
        meta = self._meta()
        if meta is not None:
            served["meta"] = meta
        return {"object": "list", "data": [served] + [self._model_entry(n) for n in names]}

    async def model(self, request: Request, model_id: str) -> Response:
        mine = self._model_id(request)
        if model_id != mine and model_id not in await run_in_threadpool(self._library, request):
            return JSONResponse({"error": {"message": f"The model '{model_id}' does not exist",
                                           "type": "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        return JSONResponse(self._model_entry(model_id))

    # -- generation
    async def completions(self, request: Request) -> Response:
        body = await read_json(request)
        prompts = body.get("prompt")
        if isinstance(prompts, list) and len(prompts) > 1 and all(isinstance(p, str) for p in prompts):
            n = self._n(body)
            if len(prompts) * n > MAX_CHOICES:
                raise FieldError(f"'prompt' lists {len(prompts)} prompts with n = {n}: at most {MAX_CHOICES} "
                                 f"choices in all", "prompt")
            # OpenAI: the choices of prompt k are indices k*n .. k*n+n-1
            reqs = [self._again(build_request(self.pm, "openai.completions", dict(body, prompt=p), self.settings,
                                              self.engine), i) for p in prompts for i in range(n)]
        else:
            req = build_request(self.pm, "openai.completions", body, self.settings, self.engine)
            reqs = [self._again(req, i) for i in range(self._n(body))]
        return await self._respond(request, body, reqs, chat=False, n=self._n(body))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        messages = chat_messages(body)
        spec = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
        grammar = None
        if spec is not None and spec.active:
            # llama.cpp's generic tool format: the answer is JSON under a grammar, the prompt asks for it
            if Fields(body).has("grammar", "grammar_string"):
                raise FieldError("'grammar' cannot be combined with 'tools'", "grammar")
            grammar = spec.grammar(response_schema(body))
            messages = spec.prepare(messages, getattr(getattr(self.engine, "template", None), "system", ""))
        prompt = chat_prompt(self.pm, self.engine, messages, tools=spec.tools if spec is not None else None)
        req = build_request(self.pm, "openai.chat", body, self.settings, self.engine, prompt=prompt, grammar=grammar)
        if not (grammar or response_schema(body) is not None):
            # A grammar bounds the answer itself; a template stop string could only cut its JSON short.
            req.stop = tuple(dict.fromkeys(tuple(req.stop) + chat_stops(self.engine)))
        reqs = [self._again(req, i) for i in range(self._n(body))]
        return await self._respond(request, body, reqs, chat=True, n=len(reqs),
                                   tools=spec if spec is not None and spec.active else None)

    @staticmethod
    def _n(body: dict) -> int:
        return Fields(body).int("n", 1, lo=1, hi=MAX_CHOICES)

    @staticmethod
    def _again(req: GenerationRequest, i: int) -> GenerationRequest:
        """Choice i of n: the same request with the seed advanced by i (llama.cpp gives its child completions
        seed + 1, + 2, ...), so seeded choices differ and stay reproducible; unseeded ones get a seed each."""
        seed = req.sampling.seed
        sampling = req.sampling if seed is None or seed < 0 else req.sampling.replace(seed=seed + i)
        return dataclasses.replace(req, request_id=None, sampling=sampling)

    async def _respond(self, request: Request, body: dict, reqs: list[GenerationRequest], chat: bool,
                       n: int = 1, tools: Optional[ToolSpec] = None) -> Response:
        """Answer with one choice per request, in order; `n` choices share each prompt."""
        f = Fields(body)
        stream = f.bool("stream", False)
        model = self._model_id(request)
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        top = top_logprobs(body) if chat else None
        if stream:
            so = body.get("stream_options")
            include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
            gs = GenerationStream(self.engine, reqs[0])
            await run_watching_disconnect(request, gs.start(), gs.cancel)      # refusals still get a status
            current = [gs]
            deltas = (lambda i: ChatDeltas(i, tools, top)) if chat else CompletionDeltas
            env = Envelope(cid, "chat.completion.chunk" if chat else "text_completion", created, model,
                           fingerprint=True)
            chunks = choice_chunks(self.engine, current, reqs, deltas, env, include_usage, n)
            return SSEResponse(chunks, on_disconnect=lambda: current[0].cancel())

        choices, last_events = [], []
        for i, req in enumerate(reqs):
            gs = GenerationStream(self.engine, req)
            entries: list[dict] = []
            text, last = await run_watching_disconnect(request, collect(gs, entries), gs.cancel)
            last_events.append(last)
            if chat:
                message, called = answer_message(text, tools)
                choice = chat_choice(i, message, chat_logprobs(entries, top) if entries else None,
                                     "tool_calls" if called else finish_reason(last))
            else:
                choice = completion_choice(i, text, completion_logprobs(entries, 0) if entries else None,
                                           finish_reason(last))
            choices.append(choice)
        env = Envelope(cid, "chat.completion" if chat else "text_completion", created, model, fingerprint=True)
        out = env.answer(choices, usage_of(last_events, n))
        out["timings"] = llama_timings(last_events[0])
        return JSONResponse(out)

    async def embeddings(self, request: Request) -> dict:
        body = await read_json(request)
        model = self._model_id(request)
        return await run_in_threadpool(embeddings_response, self.engine, body, model, truncate_default=False)

    # -- text-generation-webui internals
    async def encode(self, request: Request) -> dict:
        body = await read_json(request)
        text = Fields(body).str(("text", "prompt"), "")
        ids = await run_in_threadpool(self.engine.tokenize, text, Fields(body).bool("add_bos_token", True))
        return {"tokens": list(ids), "length": len(ids)}

    async def decode(self, request: Request) -> dict:
        body = await read_json(request)
        ids = body.get("tokens")
        n_vocab = int(self.engine.model_info()["n_vocab"])
        if (not isinstance(ids, list) or
                not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab for i in ids)):
            raise FieldError(f"'tokens' must be a list of token ids (0..{n_vocab - 1})", "tokens")
        return {"text": await run_in_threadpool(self.engine.detokenize, ids)}

    async def token_count(self, request: Request) -> dict:
        body = await read_json(request)
        text = Fields(body).str(("text", "prompt"), "")
        ids = await run_in_threadpool(self.engine.tokenize, text, True)
        return {"length": len(ids)}

    async def logits(self, request: Request) -> JSONResponse:
        """text-generation-webui's /v1/internal/logits: {token text: probability} of the `top_logits` (50) most likely
        next tokens after `prompt`, of the model itself or, with `use_samplers`, of the candidates the request's
        samplers leave (one token is generated to get them; the prompt stays in the cache for the next request)."""
        body = await read_json(request)
        f = Fields(body)
        if not isinstance(body.get("prompt"), str):
            raise FieldError("'prompt' must be a string", "prompt")
        n_vocab = int(self.engine.model_info()["n_vocab"])
        top = f.int("top_logits", 50, lo=1, hi=n_vocab)
        req = build_request(self.pm, "openai.completions", dict(body, max_tokens=1, logprobs=None, echo=False, n=1,
                                                                 stream=False), self.settings, self.engine)
        req = dataclasses.replace(req, n_probs=top, post_sampling_probs=f.bool("use_samplers", False), stop=())
        gs = GenerationStream(self.engine, req)
        entries: list = []
        await run_watching_disconnect(request, collect(gs, entries), gs.cancel)
        alternatives = entries[0]["top_logprobs"] if entries else []
        return JSONResponse({_escaped(t["token"]): math.exp(t["logprob"]) for t in alternatives})

    async def model_info(self, request: Request) -> dict:
        return {"model_name": self._model_id(request), "lora_names": [], "loader": "airobackend",
                **(self._meta() or {})}

    async def stop_generation(self, request: Request) -> Response:
        self.engine.abort(None)
        return JSONResponse("OK")


# ---------------------------------------------------------------------------------------------- streams

KEEPALIVE = b": keep-alive\n\n"   # an SSE comment: every OpenAI client skips it (sse-starlette sends ": ping")
KEEPALIVE_S = 15.0                  # while a long prompt is evaluated, proxies and clients see the stream alive
# What a stream sends in place of its next chunk when generation fails after the headers went out.
FAILED_SSE = encode_sse({"error": {"message": "generation failed", "type": "server_error", "param": None,
                                   "code": None}})


def sse_chunk(env: Envelope, choice: dict, last: Optional[GenerationEvent] = None) -> bytes:
    """One chunk; the last one of a choice (`last`, its final event) carries llama.cpp's `timings` as llama.cpp's
    server sends them."""
    c = env.chunk(choice)
    if last is not None:
        c["timings"] = llama_timings(last)
    return encode_sse(c)


async def choice_chunks(engine: EngineAPI, current: list[GenerationStream], reqs: list[GenerationRequest],
                        deltas: Callable[[int], CompletionDeltas | ChatDeltas], env: Envelope, include_usage: bool,
                        n: int = 1) -> AsyncIterator[bytes]:
    """The stream of one response: each choice's chunks in turn (choice i after choice i-1 ends, as the engine runs
    one generation at a time; `current[0]`, already started, is choice 0), the usage chunk if asked, then [DONE]."""
    finals: list[GenerationEvent] = []
    for i, req in enumerate(reqs):
        if i:
            current[0] = GenerationStream(engine, req)
            try:
                await current[0].start()
            except Exception as e:           # busy or gone: the headers are out, so end the way clients understand
                log.error("choice %d of a stream could not start: %s", i, e)
                yield FAILED_SSE
                break
        async for b in one_choice(current[0], env, deltas(i), finals):
            yield b
        if len(finals) <= i:                 # that choice failed
            break
    if include_usage and finals:
        yield encode_sse(env.usage_chunk(usage_of(finals, n)))
    yield DONE


async def one_choice(gs: GenerationStream, env: Envelope, deltas: CompletionDeltas | ChatDeltas,
                     finals: list[GenerationEvent]) -> AsyncIterator[bytes]:
    """The chunks of one choice (airobackend.openai_shapes shapes them), keep-alive comments while none come, and
    FAILED_SSE if the engine fails; its final event is appended to `finals`."""
    first = deltas.first()
    if first is not None:
        yield sse_chunk(env, first)
    async with aclosing(live_events(gs, KEEPALIVE_S)) as events:
        async for ev in events:
            if ev is PING:
                yield KEEPALIVE
                continue
            if ev is FAILED:
                yield FAILED_SSE
                break
            for choice in deltas.feed(ev):
                yield sse_chunk(env, choice, ev if choice["finish_reason"] is not None else None)
            if ev.finish_reason is not None:
                finals.append(ev)
