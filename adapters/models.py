"""Model management routes over the server's ModelManager (a built-in plugin like the others).

The routes other adapters already serve stay theirs: POST /api/v1/model (text-generation-webui's legacy actions
list/info/load/unload, in adapters/textgen.py), GET /api/v1/model (KoboldAI), GET /v1/internal/model/info and
GET /v1/models (adapters/openai.py); they reach the same ModelManager. This plugin adds:

text-generation-webui, OpenAI-style extension (`extensions/openai/script.py` at commit 3013758):
    GET /v1/internal/model/list, POST /v1/internal/model/load, POST /v1/internal/model/unload
KoboldCpp admin API (KoboldCpp >= 1.80 `--admin`; the routes KoboldAI Lite and SillyTavern's model-loader
extension call):
    GET /api/admin/list_options -> ["initial_model", "unload_model", <model names>...]
    POST /api/admin/reload_config {"filename": <model name> | "initial_model" | "unload_model"} -> {"success": bool}
    GET /api/admin/load_status -> {"loaded", "loading", "progress", "last_error"} (ours: the progress to poll)
KoboldCpp restarts itself on reload_config and answers at once; we switch in place, also answering at once, and
the client polls GET /api/v1/model (or /api/admin/load_status) until the new name appears.

Model changes and the library list are admin actions: each route carries the server's one admin check
(`airobackend.server.ADMIN`: the admin key, or the API key when no admin key is set, as text-generation-webui
rules; a web page of another origin also needs its origin listed with --cors). No answer ever contains a file
system path.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from airobackend.adapters.kobold import config_overrides
from airobackend.adapters.textgen import load_options
from airobackend.errors import AiroError, EngineBusy
from airobackend.hookspecs import hookimpl
from airobackend.server import ADMIN, FieldError, Fields, json_schema_body, read_json
from airobackend.settings import Settings
from airobackend.types import EngineAPI, ModelLibrary, is_model_library

log = logging.getLogger("airobackend.adapters.models")

@hookimpl
def register_routes(engine: EngineAPI, settings: Settings, pm: pluggy.PluginManager) -> Optional[APIRouter]:
    if not is_model_library(engine):
        log.info("the engine is not a ModelManager: model management routes are off")
        return None
    return ModelRoutes(engine, settings).router


class ModelRoutes:
    """The route handlers, closing over the ModelManager and settings."""

    def __init__(self, manager: ModelLibrary, settings: Settings) -> None:
        self.manager, self.settings = manager, settings
        r = self.router = APIRouter(tags=["Model library"])
        admin = [ADMIN]
        r.add_api_route("/v1/internal/model/list", self.internal_list, methods=["GET"], dependencies=admin,
                        summary="text-generation-webui: the library (admin)")
        r.add_api_route("/v1/internal/model/load", self.internal_load, methods=["POST"], dependencies=admin,
                        summary="text-generation-webui: load a model (admin)",
                        openapi_extra=json_schema_body({"model_name": "model.gguf", "args": {"n_ctx": 2048}},
                                                       "model_name, args"))
        r.add_api_route("/v1/internal/model/unload", self.internal_unload, methods=["POST"], dependencies=admin,
                        summary="text-generation-webui: unload the model (admin)")
        r.add_api_route("/api/admin/list_options", self.admin_list, methods=["GET"], dependencies=admin,
                        summary="KoboldCpp admin: models that can be switched to (admin)")
        r.add_api_route("/api/admin/reload_config", self.admin_reload, methods=["POST"], dependencies=admin,
                        summary="KoboldCpp admin: switch to a model (admin); answers at once",
                        openapi_extra=json_schema_body({"filename": "model.gguf"}, "filename: a model name"))
        r.add_api_route("/api/admin/load_status", self.admin_status, methods=["GET"],
                        summary="Model load progress and the last load error")

    # ------------------------------------------------------------------ shared

    def _names(self) -> list[str]:
        return [m["name"] for m in self.manager.list_models()]

    @staticmethod
    def _failed(e: AiroError, msg: str) -> JSONResponse:
        """A refused or failed model change: 503 when busy, else 400, in the three error shapes clients read
        (text-generation-webui `detail`, KoboldCpp `success`/`detail.msg`, OpenAI `error`)."""
        status = 503 if isinstance(e, EngineBusy) else 400
        return JSONResponse({"success": False, "detail": msg,
                             "error": {"message": msg, "type": type(e).__name__, "param": None,
                                       "code": "server_busy" if status == 503 else "model_load_failed"}},
                            status_code=status)

    async def _load(self, name: str, options: dict) -> Any:
        return await run_in_threadpool(lambda: self.manager.load(name, **options))

    # ------------------------------------------------------------------ text-generation-webui OpenAI extension

    async def internal_list(self) -> Any:
        return {"model_names": self._names()}

    async def internal_load(self, request: Request) -> Any:
        body = await read_json(request)
        f = Fields(body)
        name = f.str("model_name", "")
        if not name:
            raise FieldError("'model_name' is required", "model_name")
        options = load_options(body.get("args"))
        settings = body.get("settings")
        if isinstance(settings, dict) and settings.get("instruction_template"):
            options["template"] = Fields(settings).str("instruction_template", None)
        try:
            await self._load(name, options)
        except AiroError as e:
            # text-generation-webui: 400 {"detail": "Failed to load the model."}; we add why, in both shapes.
            return self._failed(e, f"Failed to load the model. {e}")
        return JSONResponse("OK")

    async def internal_unload(self) -> Any:
        await run_in_threadpool(self.manager.unload)
        return JSONResponse(None)

    # ------------------------------------------------------------------ KoboldCpp admin

    async def admin_list(self) -> Any:
        special = (["initial_model"] if self.manager.startup_name else []) + ["unload_model"]
        return JSONResponse(special + self._names())

    async def admin_reload(self, request: Request) -> Any:
        body = await read_json(request)
        f = Fields(body)
        name = f.str(("filename", "model", "model_name"), "")
        if not name:
            raise FieldError("'filename' is required: a model name from /api/admin/list_options", "filename")
        options = config_overrides(body.get("overrides"))
        if name == "unload_model":
            await run_in_threadpool(self.manager.unload)
            return {"success": True}
        if name == "initial_model":
            name = self.manager.startup_name or ""
            if not name:
                raise FieldError("the server was started without a model: there is no initial_model", "filename")
        try:
            # Everything that refuses the switch (a wrong name, a model that does not fit, a load under way) is
            # answered now; the switch itself runs in the background while the client polls /api/v1/model or
            # /api/admin/load_status.
            await run_in_threadpool(lambda: self.manager.start_load(name, **options))
        except AiroError as e:
            return self._failed(e, str(e))
        return {"success": True}

    async def admin_status(self) -> dict:
        m = self.manager
        return {"loaded": m.loaded_name, "loading": m.loading_name or None, "progress": round(m.load_progress, 4),
                "last_error": m.last_error}
