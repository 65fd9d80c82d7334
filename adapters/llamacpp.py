"""llama.cpp server's slot and monitoring routes (examples/server).

    GET /slots                                                  -> per slot: id, n_ctx, is_processing, tokens cached...
    GET /metrics                                                -> Prometheus text (prometheus_client)
    POST /slots/{id}?action=save     {"filename": "chat1.bin"} -> {id_slot, filename, n_saved, n_written, timings}
    POST /slots/{id}?action=restore  {"filename": "chat1.bin"} -> {id_slot, filename, n_restored, n_read, timings}
    POST /slots/{id}?action=erase                               -> {id_slot, n_erased}

As in llama.cpp (examples/server/server.cpp at c392e5094, handle_slots_action), the files live in one folder
(llama.cpp's --slot-save-path; ours is --prompt-cache-dir) and a client names only a plain file in it; without the
folder the routes answer 501. Writing and replacing files on the server is an admin action here: the route carries
server.ADMIN, the check the model-switch routes use (the admin key; web pages of other origins refused). A file made by another model, or a
truncated or corrupt one, is refused with a 400 that says so, and the slot keeps what it had. Errors have llama.cpp's
shape {"error": {"code", "message", "type"}}. The GET routes sit behind the API key, as llama.cpp's do; with
--parallel N there are N slots.
"""
from __future__ import annotations

import logging

import pluggy
from fastapi import APIRouter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from airobackend.errors import AiroError, ModelNotLoaded, RequestError
from airobackend.hookspecs import hookimpl
from airobackend.server import ADMIN, json_schema_body, read_json
from airobackend.settings import Settings
from airobackend.types import EngineAPI

log = logging.getLogger("airobackend.adapters.llamacpp")


@hookimpl
def register_routes(engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> APIRouter:
    return SlotRoutes(engine).router


def llama_error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": type_}}, status_code=status)


# llama.cpp server's metric names (examples/server/server.cpp at c392e5094, handle_metrics); counters are exposed
# with prometheus_client's "_total" suffix as llama.cpp names them. (name, kind, help, key in Engine.metrics())
METRICS = [
    ("llamacpp:prompt_tokens", "counter", "Number of prompt tokens processed.", "prompt_tokens"),
    ("llamacpp:prompt_seconds", "counter", "Prompt process time", "prompt_seconds"),
    ("llamacpp:tokens_predicted", "counter", "Number of generation tokens processed.", "tokens_predicted"),
    ("llamacpp:tokens_predicted_seconds", "counter", "Predict process time", "predicted_seconds"),
    ("llamacpp:n_decode", "counter", "Total number of forward passes (llama_decode() calls)", "steps"),
    ("llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage_ratio"),
    ("llamacpp:kv_cache_tokens", "gauge", "KV-cache tokens.", "kv_cache_tokens"),
    ("llamacpp:requests_processing", "gauge", "Number of requests processing.", "requests_processing"),
    ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", "requests_deferred"),
    ("airobackend:prompt_cache_hits", "counter", "Requests that reused tokens cached in a slot or a saved state.",
     "cache_hits"),
]


class EngineCollector:
    """The engine's counters, read at each scrape (a custom collector: the engine owns the numbers)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        for name, kind, doc, key in METRICS:
            yield (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, value=float(m[key]))
        for name, doc, num, den in (("llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
                                     "prompt_tokens", "prompt_seconds"),
                                    ("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s.",
                                     "tokens_predicted", "predicted_seconds")):
            yield GaugeMetricFamily(name, doc, value=m[num] / m[den] if m[den] else 0.0)


class SlotRoutes:
    def __init__(self, engine: EngineAPI) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))
        self.router = APIRouter(tags=["llama.cpp server"])
        self.router.add_api_route("/slots", self.slots, methods=["GET"], response_model=None,
                                  summary="Each slot's state: processing or idle, tokens cached (llama.cpp)")
        self.router.add_api_route("/metrics", self.metrics, methods=["GET"], response_model=None,
                                  summary="Prometheus metrics: tokens/s, requests processing and deferred, KV usage")
        self.router.add_api_route("/slots/{id_slot}", self.action, methods=["POST"], response_model=None,
                                  dependencies=[ADMIN],
                                  summary="Save, restore or erase a slot's KV cache (admin)",
                                  openapi_extra=json_schema_body({"filename": "chat1.bin"},
                                                                 "filename: a plain file name in --prompt-cache-dir"))

    async def slots(self) -> JSONResponse:
        try:
            return JSONResponse(self.engine.slots_info())
        except ModelNotLoaded as e:
            return llama_error(503, str(e), "unavailable_error")
        except RequestError as e:
            return llama_error(501, str(e), "not_supported_error")

    async def metrics(self) -> Response:
        try:
            body = generate_latest(self.registry)
        except ModelNotLoaded as e:
            return llama_error(503, str(e), "unavailable_error")
        except RequestError as e:
            return llama_error(501, str(e), "not_supported_error")
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def action(self, request: Request, id_slot: str) -> JSONResponse:
        try:
            slot = int(id_slot)
        except ValueError:
            return llama_error(400, "Invalid slot ID", "invalid_request_error")
        action = request.query_params.get("action", "")
        try:
            if action == "erase":
                return JSONResponse(await run_in_threadpool(self.engine.erase_slot, slot))
            if action not in ("save", "restore"):
                return llama_error(400, "Invalid action", "invalid_request_error")
            body = await read_json(request)
            filename = body.get("filename")
            if not isinstance(filename, str) or not filename:
                return llama_error(400, "'filename' is required: a file name in the prompt-cache folder",
                                   "invalid_request_error")
            fn = self.engine.save_slot if action == "save" else self.engine.restore_slot
            return JSONResponse(await run_in_threadpool(fn, slot, filename))
        except NotImplementedError as e:
            return llama_error(501, str(e), "not_supported_error")
        except ModelNotLoaded as e:
            return llama_error(503, str(e), "unavailable_error")
        except RequestError as e:
            return llama_error(400, str(e), "invalid_request_error")
        except OSError as e:                          # no path in the answer: only what went wrong
            log.error("slot %s %s failed: %s", id_slot, action, e)
            return llama_error(500, f"slot {action} failed: {e.strerror or type(e).__name__}", "server_error")
        except AiroError as e:
            log.error("slot %s %s failed: %s", id_slot, action, e)
            return llama_error(500, f"slot {action} failed: {e}", "server_error")
