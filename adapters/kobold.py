"""KoboldAI United API v1 plus KoboldCpp's /api/extra routes, as KoboldCpp 1.76 serves them (`koboldcpp.py`).

What KoboldAI Lite, SillyTavern ("KoboldAI Classic" and "Text Completion -> KoboldCpp") and `koboldapi` call:
model/version/config probes, blocking and SSE generation, polled partial text, genkey-scoped abort, token counting,
perf counters. `/api/extra/version` says "KoboldCpp" because SillyTavern and Lite detect features by it.

POST /api/v1/generate is also text-generation-webui's legacy blocking route: a body in that dialect (it has
`max_new_tokens` or `stopping_strings` and no `max_length`) is mapped by whichever plugin answers the "textgen"
protocol, so both kinds of client get their own defaults and stop-string semantics from one handler.
"""
from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airobackend.aio import FAILED, GenerationStream, collect, live_events
from airobackend.embeddings import embeddings_response
from airobackend.errors import ModelNotLoaded, RequestError
from airobackend.hookspecs import hookimpl
from airobackend.json_schema import schema_to_grammar
from airobackend.manager import option_number, parse_load_options, renamed
from airobackend.server import (ErrorInfo, FieldError, Fields, build_request, json_schema_body, loaded_model_name,
                                read_json, run_watching_disconnect, sampling_params, sees_names)
from airobackend.settings import Settings
from airobackend.sse import SSEResponse, encode_sse
from airobackend.types import EngineAPI, FinishReason, GenerationEvent, GenerationRequest

log = logging.getLogger("airobackend.adapters.kobold")

KOBOLDCPP_VERSION = "1.76"          # the newest KoboldCpp whose API we implement; Lite gates features on it
UNITED_API_VERSION = "1.2.5"        # KoboldAI United API version (stop_sequence >= 1.2.2, badwordsids >= 1.2.4)
MAX_STOP_SEQUENCES = 32             # KoboldCpp's limits: extra entries are dropped, as KoboldCpp does
LOGPROBS_MAX = 5                    # KoboldCpp's logprobs_max: alternatives recorded per token
# KoboldCpp's server-side defaults for absent fields (KoboldCpp 1.76 `koboldcpp.py`, `generate()`)
KOBOLD_DEFAULTS = dict(temperature=0.7, top_k=100, top_p=0.92, min_p=0.0, typical_p=1.0, tfs=1.0, top_a=0.0,
                       repetition_penalty=1.0, repetition_penalty_range=320, repetition_penalty_slope=1.0,
                       presence_penalty=0.0, frequency_penalty=0.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1,
                       dynatemp_range=0.0, dynatemp_exponent=1.0, seed=None, ban_eos=False)
# KoboldCpp's stop_reason codes for /api/extra/perf (KoboldCpp 1.76 `expose.h`: INVALID -1, OUT_OF_TOKENS 0,
# EOS_TOKEN_HIT 1, CUSTOM_STOPPER 2). An abort is reported as a custom stop, as KoboldCpp does; -1 before any
# generation.
STOP_REASON = {FinishReason.LENGTH: 0, FinishReason.EOS: 1, FinishReason.STOP: 2, FinishReason.ABORTED: 2}
TEXTGEN_MARKERS = ("max_new_tokens", "stopping_strings")

GENERATE_EXAMPLE = {"prompt": "USER: Tell me about llamas. ASSISTANT:", "max_length": 80, "temperature": 0.7,
                    "top_p": 0.92, "stop_sequence": ["USER:"], "trim_stop": True, "genkey": "KCPP1234"}


# ---------------------------------------------------------------------------------------------- request mapping

def to_generation_request(payload: dict, *, n_ctx: int, n_vocab: int) -> GenerationRequest:
    """Map a KoboldAI/KoboldCpp generate body to a GenerationRequest, with KoboldCpp's defaults.

    Unknown fields are ignored; KoboldCpp's aliases (repetition_penalty, repeat_penalty, banned_strings, ...) are
    accepted (KoboldCpp 1.76 `koboldcpp.py`, `transform_genparams`). Raises FieldError naming the field for wrong types,
    NaN/inf, and values no sampler can use.
    """
    f = Fields(payload)
    prompt = f.str("prompt", "")
    memory = f.str("memory", "")
    max_ctx = min(f.int("max_context_length", n_ctx, lo=1), n_ctx)
    max_length = f.int(("max_length", "max_new_tokens"), 180, lo=1)
    # KoboldCpp keeps room for the prompt: max_length <= max_context_length - min(max_context_length - 4, 16)
    max_length = max(1, min(max_length, max_ctx - min(max_ctx - 4, 16)))

    sampling = sampling_params(payload, n_vocab, **KOBOLD_DEFAULTS)
    bypass_eos = f.bool("bypass_eos", False)     # KoboldAI Lite's "Bypass EOS" ban mode
    if bypass_eos:
        sampling = sampling.replace(ban_eos=False)  # KoboldCpp bans the end token only without bypass
    genkey = f.str("genkey", "")
    return GenerationRequest(
        prompt=prompt,                     # the engine puts `memory` in front and keeps it on a shift
        max_tokens=max_length,
        stop=f.str_list(("stop_sequence", "stop"), max_items=1024)[:MAX_STOP_SEQUENCES],
        trim_stop=f.bool("trim_stop", False),
        render_special=f.bool("render_special", False),
        add_bos=True,
        sampling=sampling,
        memory=memory or None,
        genkey=genkey or None,
        bypass_eos=bypass_eos,
        grammar_retain_state=f.bool("grammar_retain_state", False),
        # KoboldCpp (since 1.77) records the final candidates of every token, for `logprobs` and last_logprobs
        n_probs=LOGPROBS_MAX,
        post_sampling_probs=True,
    )


def kobold_logprobs(entries: list[dict]) -> dict:
    """KoboldCpp 1.77's logprobs object (koboldcpp.py parse_last_logprobs): the chat shape (`content`) and the
    completions shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) side by side, from the sampler's
    final candidates, at most 5 alternatives per token."""
    out: dict[str, list] = {"content": [], "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for e in entries:
        tok = e["token"]
        tops = e.get("top_logprobs", [])[:LOGPROBS_MAX]
        out["tokens"].append(tok)
        out["token_logprobs"].append(e["logprob"])
        out["text_offset"].append(offset)
        offset += len(tok)
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in tops})
        out["content"].append({"token": tok, "logprob": e["logprob"], "bytes": list(tok.encode("utf-8")),
                               "top_logprobs": [{"token": t["token"], "logprob": t["logprob"],
                                                 "bytes": list(t["token"].encode("utf-8"))} for t in tops]})
    return out


def finish_reason(ev: Optional[GenerationEvent]) -> str:
    """KoboldCpp's finish_reason: "stop" only for EOS; anything else (stop string, length, abort) is "length"."""
    return "stop" if ev is not None and ev.finish_reason == FinishReason.EOS else "length"


def looks_like_textgen(payload: dict) -> bool:
    return any(k in payload for k in TEXTGEN_MARKERS) and "max_length" not in payload \
        and "stop_sequence" not in payload


# ---------------------------------------------------------------------------------------------- plugin hooks

@hookimpl
def build_generation_request(protocol: str, payload: dict, engine: EngineAPI) -> Optional[GenerationRequest]:
    if protocol != "kobold":
        return None
    info = engine.model_info()
    return to_generation_request(payload, n_ctx=int(info["n_ctx"]), n_vocab=int(info["n_vocab"]))


@hookimpl
def register_routes(engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> APIRouter:
    return KoboldRoutes(engine, settings, pm).router


# KoboldCpp's config fields in a model switch's `overrides` (its `koboldcpp.py` arguments) -> ours
KOBOLD_QUANTKV = ("f16", "q8_0", "q4_0")          # --quantkv 0, 1, 2 (keys and values)
KOBOLD_CONFIG_SPELLINGS = {
    "contextsize": renamed("n_ctx"),
    "threads": renamed("n_threads"),
    "blasbatchsize": renamed("n_batch"),
    "quantkv": lambda value, where: dict.fromkeys(
        ("cache_type_k", "cache_type_v"), KOBOLD_QUANTKV[int(option_number(value, where, 0, 2, integer=True))]),
}


def config_overrides(overrides: Any, param: str = "overrides") -> dict:
    """A KoboldCpp admin reload's `overrides` (contextsize, threads, ...) as load() options."""
    return parse_load_options(overrides, param, KOBOLD_CONFIG_SPELLINGS)


# error kind -> KoboldCpp's detail.type
KOBOLD_ERRORS = {"missing_key": "unauthorized", "unauthorized": "unauthorized", "forbidden": "unauthorized",
                 "too_large": "bad_input", "busy": "service_unavailable", "not_loaded": "service_unavailable",
                 "backend_unavailable": "service_unavailable",
                 "context_length": "bad_input", "bad_request": "bad_input", "not_found": "not_found",
                 "method_not_allowed": "bad_input", "server_error": "server_error"}


@hookimpl(trylast=True)
def error_response(path: str, method: str, error: ErrorInfo) -> Optional[Response]:
    """KoboldCpp's error body {"detail": {"msg", "type"}} on every path outside /v1 (SillyTavern reads detail.msg
    for every /api backend, text-generation-webui's legacy routes included); auth errors add detail.error, and an
    unknown page outside /api gets KoboldCpp's plain-text 404."""
    if path == "/v1" or path.startswith("/v1/"):
        return None
    if error.kind == "not_found" and method == "GET" and not path.startswith("/api"):
        return HTMLResponse("Error: HTTP Server is running, but this endpoint does not exist. Please check the URL.",
                            status_code=404)
    detail = {"msg": error.message, "type": KOBOLD_ERRORS.get(error.kind, "server_error")}
    if error.kind in ("missing_key", "unauthorized", "forbidden"):
        detail = {"error": "Forbidden" if error.kind == "forbidden" else "Unauthorized", **detail}
    return JSONResponse({"detail": detail}, status_code=error.status)


def kobold_model_name(file_name: str) -> str:
    """KoboldCpp names a model by its file name without the last extension ('x.ggmlv3.q4_K_M.bin' -> 'x.ggmlv3.q4_K_M')."""
    stem, dot, ext = str(file_name).rpartition(".")
    return stem if dot and stem and ext.lower() in ("bin", "gguf", "zip", "ggml") else str(file_name)


def model_result(engine: EngineAPI, request: Request, settings: Settings) -> str:
    """GET /api/v1/model's `result`: 'koboldcpp/<name>', masked without the key, 'ReadOnly' with no model."""
    if not sees_names(request, settings):
        return "koboldcpp/protected-model"
    name = loaded_model_name(engine)
    if name is None:
        return "ReadOnly"      # KoboldAI Lite and SillyTavern read this as "no model loaded"
    return "koboldcpp/" + kobold_model_name(name)


class KoboldRoutes:
    """The route handlers, closing over the engine, settings and plugin manager."""

    def __init__(self, engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.engine, self.settings, self.pm = engine, settings, pm
        self.started = time.time()
        r = self.router = APIRouter(tags=["KoboldAI / KoboldCpp"])
        get = lambda path, fn, **kw: r.add_api_route(path, fn, methods=["GET"], response_model=None, **kw)      # noqa: E731
        post = lambda path, fn, **kw: r.add_api_route(path, fn, methods=["POST"], response_model=None, **kw)    # noqa: E731
        get("/api/v1/model", self.model, summary="Loaded model name (koboldcpp/<name>)")
        get("/api/v1/info/version", self.united_version, summary="KoboldAI United API version")
        get("/api/v1/config/max_length", self.max_length, summary="Largest max_length accepted")
        get("/api/v1/config/max_context_length", self.max_context_length, summary="Context size")
        get("/api/v1/config/soft_prompt", lambda: {"value": ""}, include_in_schema=False)
        get("/api/v1/config/soft_prompts_list", lambda: {"values": []}, include_in_schema=False)
        post("/api/v1/generate", self.generate, summary="Generate (blocking)",
             openapi_extra=json_schema_body(GENERATE_EXAMPLE, "KoboldAI generate body (unknown fields ignored)"))
        get("/api/extra/version", self.version, summary="Server identity: KoboldCpp-compatible")
        get("/api/extra/true_max_context_length", self.true_max_context_length,
            summary="Context size, with the trained context and RoPE values")
        post("/api/extra/generate/stream", self.stream, summary="Generate with SSE streaming",
             openapi_extra=json_schema_body(GENERATE_EXAMPLE, "Same body as /api/v1/generate"))
        get("/api/extra/generate/check", self.check_get, summary="Partial text of the running generation")
        post("/api/extra/generate/check", self.check_post, summary="Partial text of the generation with this genkey")
        post("/api/extra/abort", self.abort, summary="Abort a generation (genkey optional, body optional)")
        post("/api/extra/tokencount", self.tokencount, summary="Count tokens: {value, ids}")
        post("/api/extra/tokenize", self.tokencount, summary="Tokenize: {value, ids}")
        post("/api/extra/detokenize", self.detokenize, summary="Detokenize ids: {result, success}")
        get("/api/extra/perf", self.perf, summary="Performance counters")
        post("/api/extra/embeddings", self.embeddings, summary="Embeddings, as /v1/embeddings (truncate: true)",
             openapi_extra=json_schema_body({"input": ["first text", "second text"], "truncate": True},
                                            "KoboldCpp embeddings request"))
        post("/api/extra/json_to_grammar", self.json_to_grammar, summary="JSON schema -> GBNF grammar",
             openapi_extra=json_schema_body({"schema": {"type": "object", "properties": {"name": {"type": "string"}},
                                                        "required": ["name"]}},
                                            "{\"schema\": <JSON schema>} (a bare schema works too)"))
        r.add_api_route("/api/extra/last_logprobs", self.last_logprobs, methods=["GET", "POST"], response_model=None,
                        summary="Logprobs of the last generation (POST {\"genkey\"} for a request's own)")
        get("/api/extra/preloadstory", lambda: {}, include_in_schema=False)
        get("/sdapi/v1/sd-models", lambda: [], include_in_schema=False)   # Lite probes it; no image model here
        get("/api", lambda: RedirectResponse("/docs", status_code=302), include_in_schema=False)
        get("/api/v1", lambda: RedirectResponse("/docs", status_code=302), include_in_schema=False)

    # -- probes
    async def model(self, request: Request) -> JSONResponse:
        return JSONResponse({"result": model_result(self.engine, request, self.settings)})

    async def united_version(self) -> dict:
        return {"result": UNITED_API_VERSION}

    async def version(self) -> dict:
        """KoboldCpp's identity and feature flags; a flag is true only for what this server does (Lite and
        SillyTavern switch features on by them): embeddings come from whichever model is loaded."""
        try:
            self.engine.model_info()
            loaded = True
        except ModelNotLoaded:
            loaded = False
        return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": bool(self.settings.api_key),
                "txt2img": False, "vision": False, "transcribe": False, "multiplayer": False, "websearch": False,
                "tts": False, "embeddings": loaded}

    def _n_ctx(self) -> int:
        try:
            return int(self.engine.model_info()["n_ctx"])
        except ModelNotLoaded:
            return int(self.settings.n_ctx)

    async def max_context_length(self) -> dict:
        return {"value": self._n_ctx()}

    async def true_max_context_length(self) -> dict:
        """KoboldCpp's {"value": context}; also the trained context and the RoPE values in use (automatic scaling
        beyond the trained context is reported here, as KoboldCpp prints it at load)."""
        out: dict = {"value": self._n_ctx()}
        try:
            info = self.engine.model_info()
        except ModelNotLoaded:
            return out
        out.update({k: info[k] for k in ("n_ctx_train", "rope_freq_base", "rope_freq_scale", "rope_scaling")
                    if k in info})
        return out

    async def max_length(self) -> dict:
        n_ctx = self._n_ctx()
        return {"value": max(1, min(400, n_ctx - min(n_ctx - 4, 16)))}

    # -- generation
    def _request(self, body: dict) -> GenerationRequest:
        if looks_like_textgen(body):
            req = self.pm.hook.build_generation_request(protocol="textgen", payload=body, settings=self.settings,
                                                        engine=self.engine, prompt=None, grammar=None)
            if req is not None:
                return req
        return build_request(self.pm, "kobold", body, self.settings, self.engine)

    async def generate(self, request: Request) -> JSONResponse:
        body = await read_json(request)
        want = Fields(body).bool("logprobs", False)
        stream = GenerationStream(self.engine, self._request(body))
        entries: list = []
        text, last = await run_watching_disconnect(request, collect(stream, entries), stream.cancel)
        result = {"text": text, "finish_reason": finish_reason(last)}
        if want:
            result["logprobs"] = kobold_logprobs(entries)
        return JSONResponse({"results": [result]})

    async def stream(self, request: Request) -> SSEResponse:
        body = await read_json(request)
        stream = GenerationStream(self.engine, self._request(body))
        await run_watching_disconnect(request, stream.start(), stream.cancel)   # refusals still get a status
        return SSEResponse(kobold_sse(stream), on_disconnect=stream.cancel)

    async def check_get(self) -> dict:
        return {"results": [{"text": self.engine.partial_text(None)}]}

    async def check_post(self, request: Request) -> dict:
        body = await read_json(request, allow_empty=True)
        genkey = Fields(body).str("genkey", "") or None
        return {"results": [{"text": self.engine.partial_text(genkey)}]}

    async def abort(self, request: Request) -> dict:
        body = await read_json(request, allow_empty=True)   # SillyTavern posts no body at all
        genkey = Fields(body).str("genkey", "") or None
        ok = bool(self.engine.abort(genkey))
        flag = "true" if ok else "false"
        return {"success": flag, "done": flag}

    # -- tokens
    async def tokencount(self, request: Request) -> dict:

        body = await read_json(request)
        f = Fields(body)
        prompt = f.str(("prompt", "content"), "")
        ids = await run_in_threadpool(self.engine.tokenize, prompt, f.bool("special", True))
        return {"value": len(ids), "ids": list(ids)}

    async def detokenize(self, request: Request) -> dict:

        body = await read_json(request)
        ids = body.get("ids", body.get("tokens"))
        n_vocab = int(self.engine.model_info()["n_vocab"])
        if (not isinstance(ids, list) or
                not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab for i in ids)):
            raise FieldError(f"'ids' must be a list of token ids (0..{n_vocab - 1})", "ids")
        return {"result": await run_in_threadpool(self.engine.detokenize, ids), "success": True}

    async def embeddings(self, request: Request) -> dict:
        """KoboldCpp's embeddings route (SillyTavern's vector storage, Lite's TextDB): OpenAI's request and answer
        shape; inputs longer than the batch size are cut to it unless `truncate` is false, as KoboldCpp does."""

        body = await read_json(request)
        model = model_result(self.engine, request, self.settings).removeprefix("koboldcpp/")
        return await run_in_threadpool(embeddings_response, self.engine, body, model, truncate_default=True)

    async def json_to_grammar(self, request: Request) -> JSONResponse:
        """KoboldCpp's converter route: {"schema": ...} -> {"result": <GBNF>, "success": true}. A schema that cannot
        be converted is a 400 in KoboldCpp's error shape with "success": false beside it (what clients test)."""
        body = await read_json(request)
        schema = body["schema"] if isinstance(body.get("schema"), (dict, bool)) else body
        try:
            grammar = schema_to_grammar(schema, param="schema")
        except RequestError as e:
            return JSONResponse({"detail": {"msg": str(e), "type": "bad_input"}, "success": False}, status_code=400)
        return JSONResponse({"result": grammar, "success": True})

    async def perf(self) -> dict:
        """KoboldCpp 1.76's /api/extra/perf from the engine's facts: its field order, its stop_reason codes, idle
        as 0/1, and the fields of features it has and we do not (image generation, horde) at their idle values."""
        p = dict(self.engine.perf())
        out = {"last_process": 0.0, "last_eval": 0.0, "last_token_count": 0, "last_seed": -1, "total_gens": 0,
               "stop_reason": -1, "total_img_gens": 0, "queue": 0, "idle": 1, "hordeexitcounter": 0,
               "uptime": round(time.time() - self.started, 3), "idletime": 0.0, "quiet": bool(self.settings.quiet)}
        reason = p.pop("stop_reason", None)
        out.update(p)
        out["idle"] = int(bool(out["idle"]))
        if reason is not None:
            out["stop_reason"] = STOP_REASON[FinishReason(reason)]
        return out

    async def last_logprobs(self, request: Request) -> dict:
        """KoboldCpp 1.77: the last generation's logprobs (a streamed one's too), by genkey as for check."""
        body = await read_json(request, allow_empty=True) if request.method == "POST" else {}
        genkey = Fields(body).str("genkey", "") or None
        try:
            entries = self.engine.last_logprobs(genkey)
        except ModelNotLoaded:
            entries = None
        return {"logprobs": kobold_logprobs(entries) if entries else None}


async def kobold_sse(stream: GenerationStream) -> AsyncIterator[bytes]:
    """KoboldCpp's SSE: `event: message` + `data: {"token", "finish_reason"}`; "null" (a string) until the end.

    Headers go out as soon as the engine accepts the request, as KoboldCpp sends them; no keep-alive comments,
    because KoboldAI Lite's parser expects nothing but `event:`/`data:` pairs. A stream that ends without its last
    event (the engine failed, or it was aborted) ends with a "length" event, which every client understands."""
    async with aclosing(live_events(stream)) as events:
        async for ev in events:
            if ev is FAILED:
                break
            if ev.finish_reason is not None:
                yield encode_sse({"token": ev.text, "finish_reason": finish_reason(ev)}, "message")
                return
            if ev.text:
                yield encode_sse({"token": ev.text, "finish_reason": "null"}, "message")
    yield encode_sse({"token": "", "finish_reason": "length"}, "message")
