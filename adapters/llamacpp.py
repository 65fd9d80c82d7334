"""llama.cpp server's slot routes: save, restore and erase a slot's KV cache (tools/server, `POST /slots/:id_slot`).

    POST /slots/{id}?action=save     {"filename": "chat1.bin"} -> {id_slot, filename, n_saved, n_written, timings}
    POST /slots/{id}?action=restore  {"filename": "chat1.bin"} -> {id_slot, filename, n_restored, n_read, timings}
    POST /slots/{id}?action=erase                               -> {id_slot, n_erased}

As in llama.cpp (examples/server/server.cpp at c392e5094, handle_slots_action), the files live in one folder
(llama.cpp's --slot-save-path; ours is --prompt-cache-dir) and a client names only a plain file in it; without the
folder the routes answer 501. Writing and replacing files on the server is an admin action here: the route carries
server.ADMIN, the check the model-switch routes use (the admin key; web pages of other origins refused). A file made by another model, or a
truncated or corrupt one, is refused with a 400 that says so, and the slot keeps what it had. Errors have llama.cpp's
shape {"error": {"code", "message", "type"}}.
"""
from __future__ import annotations

import logging

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

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


class SlotRoutes:
    def __init__(self, engine: EngineAPI) -> None:
        self.engine = engine
        self.router = APIRouter(tags=["llama.cpp server"])
        self.router.add_api_route("/slots/{id_slot}", self.action, methods=["POST"], response_model=None,
                                  dependencies=[ADMIN],
                                  summary="Save, restore or erase a slot's KV cache (admin)",
                                  openapi_extra=json_schema_body({"filename": "chat1.bin"},
                                                                 "filename: a plain file name in --prompt-cache-dir"))

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
