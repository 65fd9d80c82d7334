"""Model management routes of every protocol, over the server's ModelManager (a built-in plugin like the others).

text-generation-webui, legacy API (protocols.md 3.1):
    POST /api/v1/model  {"action": "list" | "info" | "load" | "unload", "model_name": ..., "args": {...}}
    (GET /api/v1/model belongs to the KoboldAI adapter: `{"result": "koboldcpp/<name>"}`.)
text-generation-webui, OpenAI-style extension (protocols.md 3.6):
    GET /v1/internal/model/info, GET /v1/internal/model/list, POST /v1/internal/model/load, POST .../unload
KoboldCpp admin API (KoboldCpp >= 1.80 `--admin`; the routes KoboldAI Lite and SillyTavern's model-loader
extension call):
    GET /api/admin/list_options -> ["initial_model", "unload_model", <model names>...]
    POST /api/admin/reload_config {"filename": <model name> | "initial_model" | "unload_model"} -> {"success": bool}
    GET /api/admin/load_status -> {"loaded", "loading", "progress", "last_error"} (ours: the progress to poll)
KoboldCpp restarts itself on reload_config and answers at once; we switch in place, also answering at once, and
the client polls GET /api/v1/model (or /api/admin/load_status) until the new name appears.

Model changes are admin actions: the server's guard marks a request admin when it presents --admin-key, or the
API key when no admin key is set (text-generation-webui's rule). Reading the library needs only the API key, and
no answer ever contains a file system path.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any, Optional

import pluggy
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from airobackend.errors import AiroError, EngineBusy, ModelNotLoaded
from airobackend.hookspecs import hookimpl
from airobackend.server import (KOBOLD_UNAUTHORIZED, FieldError, Fields, is_openai_path, json_schema_body,
                                openai_error, read_json)
from airobackend.settings import Settings

log = logging.getLogger("airobackend.adapters.models")

LOADER = "airobackend"
# text-generation-webui `args` of a load -> our load options (the rest, e.g. GPU settings, do not apply on CPU).
TEXTGEN_ARGS = {"n_ctx": "n_ctx", "max_seq_len": "n_ctx", "threads": "n_threads", "n_batch": "n_batch",
                "n_gqa": "n_gqa", "rms_norm_eps": "rms_norm_eps", "rope_freq_base": "rope_freq_base",
                "instruction_template": "template", "template": "template", "seed": "seed",
                "allow_disk": "allow_disk", "abort_running": "abort_running"}
INT_OPTIONS = {"n_ctx": (16, 1 << 20), "n_threads": (0, 1024), "n_batch": (1, 1 << 16), "n_gqa": (1, 256),
               "seed": (-1, 2**63 - 1)}
FLOAT_OPTIONS = {"rms_norm_eps": (1e-12, 1.0), "rope_freq_base": (1.0, 1e12), "rope_freq_scale": (1e-6, 1e3)}
BOOL_OPTIONS = ("allow_disk", "abort_running", "use_mmap")


def load_options(args: Any, param: str = "args") -> dict:
    """Validated load options from a text-generation-webui `args` object (or our own names).

    Known GPU/transformers arguments are ignored, as KoboldCpp ignores fields it has no use for; wrong types and
    values out of range are a FieldError naming the field.
    """
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise FieldError(f"'{param}' must be an object", param)
    f = Fields(args)
    out: dict = {}
    for key, value in args.items():
        if value is None:
            continue
        if key == "no_mmap":
            out["use_mmap"] = not f.bool(key, False)
            continue
        if key in ("compress_pos_emb",):           # text-generation-webui's linear RoPE scaling factor
            out["rope_freq_scale"] = 1.0 / f.float(key, 1.0, lo=1.0, hi=1e3)
            continue
        name = TEXTGEN_ARGS.get(key, key)
        if name in INT_OPTIONS:
            lo, hi = INT_OPTIONS[name]
            out[name] = f.int(key, None, lo=lo, hi=hi)
        elif name in FLOAT_OPTIONS:
            lo, hi = FLOAT_OPTIONS[name]
            out[name] = f.float(key, None, lo=lo, hi=hi)
        elif name in BOOL_OPTIONS:
            out[name] = f.bool(key, None)
        elif name == "template":
            out[name] = f.str(key, None) or None
    if "n_gqa" in out and out["n_gqa"] is not None:
        out["n_gqa"] = int(out["n_gqa"])
    return {k: v for k, v in out.items() if v is not None}


def _split(options: dict) -> tuple[dict, dict]:
    """(keyword flags of load(), overrides)."""
    flags = {k: options.pop(k) for k in ("allow_disk", "abort_running") if k in options}
    return flags, options


@hookimpl
def register_routes(engine: Any, settings: Settings, pm: pluggy.PluginManager) -> Optional[APIRouter]:
    if not hasattr(engine, "list_models"):
        log.info("the engine is not a ModelManager: model management routes are off")
        return None
    return ModelRoutes(engine, settings).router


class ModelRoutes:
    """The route handlers, closing over the ModelManager and settings."""

    def __init__(self, manager: Any, settings: Settings) -> None:
        self.manager, self.settings = manager, settings
        self._background: Optional[threading.Thread] = None
        r = self.router = APIRouter(tags=["Model library"])
        r.add_api_route("/api/v1/model", self.textgen_model, methods=["POST"],
                        summary="text-generation-webui legacy: list / info / load / unload",
                        openapi_extra=json_schema_body({"action": "load", "model_name": "model.gguf",
                                                        "args": {"n_ctx": 2048}}, "action and its arguments"))
        r.add_api_route("/v1/internal/model/info", self.internal_info, methods=["GET"],
                        summary="text-generation-webui: the loaded model")
        r.add_api_route("/v1/internal/model/list", self.internal_list, methods=["GET"],
                        summary="text-generation-webui: the library (admin)")
        r.add_api_route("/v1/internal/model/load", self.internal_load, methods=["POST"],
                        summary="text-generation-webui: load a model (admin)",
                        openapi_extra=json_schema_body({"model_name": "model.gguf", "args": {"n_ctx": 2048}},
                                                       "model_name, args"))
        r.add_api_route("/v1/internal/model/unload", self.internal_unload, methods=["POST"],
                        summary="text-generation-webui: unload the model (admin)")
        r.add_api_route("/api/admin/list_options", self.admin_list, methods=["GET"],
                        summary="KoboldCpp admin: models that can be switched to (admin)")
        r.add_api_route("/api/admin/reload_config", self.admin_reload, methods=["POST"],
                        summary="KoboldCpp admin: switch to a model (admin); answers at once",
                        openapi_extra=json_schema_body({"filename": "model.gguf"}, "filename: a model name"))
        r.add_api_route("/api/admin/load_status", self.admin_status, methods=["GET"],
                        summary="Model load progress and the last load error")

    # ------------------------------------------------------------------ shared

    def _names(self) -> list[str]:
        return [m["name"] for m in self.manager.list_models() if m.get("error") is None]

    def _loaded(self) -> Optional[str]:
        return self.manager.loaded_name

    def _info(self) -> dict:
        m = self.manager
        out = {"model_name": m.loaded_name or "None", "lora_names": [], "loader": LOADER,
               "loading": m.loading_name or None, "load_progress": round(m.load_progress, 4)}
        try:
            info = m.model_info()
        except ModelNotLoaded:
            return out
        entry = getattr(m, "loaded_entry", None)
        out.update(mix=info.get("mix"), format=info.get("format"), n_ctx=info.get("n_ctx"),
                   n_vocab=info.get("n_vocab"), template=info.get("template"))
        if entry is not None:
            out.update(size_class=entry.size_class, file_size=entry.file_size)
        return out

    @staticmethod
    def _deny(request: Request) -> Optional[JSONResponse]:
        """401 in the protocol's shape unless the request is an admin one (see the module docstring)."""
        if request.scope.get("airo.admin", False):
            return None
        if is_openai_path(request.url.path):
            return openai_error(401, "This is an admin action: the admin key (or the API key when no admin key "
                                     "is set) is required.", "authentication_error", code="invalid_api_key",
                                headers={"www-authenticate": "Bearer"})
        return JSONResponse(KOBOLD_UNAUTHORIZED, status_code=401, headers={"www-authenticate": "Bearer"})

    def _say(self, e: BaseException) -> str:
        """An error's message without file system paths."""
        return self.manager.library.redact(str(e))

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
        flags, overrides = _split(dict(options))
        return await run_in_threadpool(self.manager.load, name, **flags, **overrides)

    # ------------------------------------------------------------------ text-generation-webui legacy

    async def textgen_model(self, request: Request) -> JSONResponse:
        body = await read_json(request, allow_empty=True)
        action = body.get("action")
        if action == "list":
            return JSONResponse({"result": ["None", *self._names()]})
        if action == "info":
            return JSONResponse({"result": self._legacy_info()})
        if action in ("load", "unload"):
            denied = self._deny(request)
            if denied is not None:
                return denied
            try:
                if action == "load":
                    name = Fields(body).str("model_name", "")
                    if not name:
                        raise FieldError("'model_name' is required to load a model", "model_name")
                    options = load_options(body.get("args"))
                    if name == "None":
                        await run_in_threadpool(self.manager.unload)
                    else:
                        await self._load(name, options)
                else:
                    await run_in_threadpool(self.manager.unload)
            except AiroError as e:
                # text-generation-webui answers a failed load with status 200 and {"error": {"message": repr(e)}}.
                return JSONResponse({"error": {"message": f"{type(e).__name__}({self._say(e)!r})"}})
            return JSONResponse({"result": self._legacy_info()})
        return JSONResponse({"result": self._loaded() or "None"})

    def _legacy_info(self) -> dict:
        info = self._info()
        s = self.settings
        return {
            "model_name": info["model_name"], "lora_names": [],
            "shared.settings": {"truncation_length": info.get("n_ctx", s.n_ctx),
                                "instruction_template": info.get("template") or s.template or "None",
                                "max_new_tokens": 200, "seed": s.seed},
            "shared.args": {"loader": LOADER, "n_ctx": info.get("n_ctx", s.n_ctx), "threads": s.n_threads,
                            "n_batch": s.n_batch, "no_mmap": not s.use_mmap, "n_gqa": s.n_gqa,
                            "rms_norm_eps": s.rms_norm_eps, "rope_freq_base": s.rope_freq_base},
            "loading": info["loading"], "load_progress": info["load_progress"],
        }

    # ------------------------------------------------------------------ text-generation-webui OpenAI extension

    async def internal_info(self) -> dict:
        return self._info()

    async def internal_list(self, request: Request) -> Any:
        denied = self._deny(request)
        return denied if denied is not None else {"model_names": self._names()}

    async def internal_load(self, request: Request) -> Any:
        denied = self._deny(request)
        if denied is not None:
            return denied
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
            return self._failed(e, f"Failed to load the model. {self._say(e)}")
        return JSONResponse("OK")

    async def internal_unload(self, request: Request) -> Any:
        denied = self._deny(request)
        if denied is not None:
            return denied
        await run_in_threadpool(self.manager.unload)
        return JSONResponse(None)

    # ------------------------------------------------------------------ KoboldCpp admin

    async def admin_list(self, request: Request) -> Any:
        denied = self._deny(request)
        if denied is not None:
            return denied
        special = (["initial_model"] if self.manager.startup_name else []) + ["unload_model"]
        return JSONResponse(special + self._names())

    async def admin_reload(self, request: Request) -> Any:
        denied = self._deny(request)
        if denied is not None:
            return denied
        body = await read_json(request)
        f = Fields(body)
        name = f.str(("filename", "model", "model_name"), "")
        if not name:
            raise FieldError("'filename' is required: a model name from /api/admin/list_options", "filename")
        options = load_options(body.get("overrides"), "overrides")
        if name == "unload_model":
            await run_in_threadpool(self.manager.unload)
            return {"success": True}
        if name == "initial_model":
            name = self.manager.startup_name or ""
            if not name:
                raise FieldError("the server was started without a model: there is no initial_model", "filename")
        flags, overrides = _split(dict(options))
        try:
            # Checked now, so a wrong name or a model that does not fit is refused in this answer; the load itself
            # runs in the background while the client polls /api/v1/model or /api/admin/load_status.
            await run_in_threadpool(self.manager.check_load, name, allow_disk=flags.get("allow_disk"), **overrides)
        except AiroError as e:
            return self._failed(e, self._say(e))
        if self.manager.loading_name is not None:
            return self._failed(EngineBusy(), "a model is already loading; try again when it is ready")

        def work() -> None:
            try:
                self.manager.load(name, **flags, **overrides)
            except AiroError as e:      # recorded in manager.last_error, shown by /api/admin/load_status
                log.error("loading %s failed: %s", name, e)

        self._background = threading.Thread(target=work, name="airo-model-load", daemon=True)
        self._background.start()
        return {"success": True}

    async def admin_status(self) -> dict:
        m = self.manager
        progress = m.load_progress
        return {"loaded": m.loaded_name, "loading": m.loading_name or None,
                "progress": round(progress, 4) if math.isfinite(progress) else 0.0,
                "last_error": m.last_error}
