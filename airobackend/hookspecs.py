"""The plugin hooks of airobackend (pluggy project name and entry-point group: "airobackend").

A protocol adapter is a module (or object) with functions decorated by `hookimpl`. The three built-in adapters
(`airobackend.adapters.kobold`, `.textgen`, `.openai`) are registered exactly like third-party ones, which declare

    [project.entry-points.airobackend]
    myproto = "my_pkg.plugin"

Hooks are called with keyword arguments only, and an implementation may accept any subset of a spec's arguments
(pluggy "opt-in arguments"), so arguments can be added here later without breaking plugins. Hooks run at startup or
once per request, never once per token: pluggy is synchronous and each call has overhead.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from starlette.responses import Response

    from .server import ErrorInfo
    from .settings import Settings
    from .types import EngineAPI, GenerationRequest

PROJECT = "airobackend"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add adapter-specific flags to `airobackend serve` (each should also read an AIRO_* environment variable)."""


@hookspec
def register_routes(engine: "EngineAPI", settings: "Settings", pm: pluggy.PluginManager) -> Optional[Sequence[Any]]:
    """Return the routes to mount: a FastAPI `APIRouter` or a list of Starlette routes (earlier plugins win a clash)."""


@hookspec(firstresult=True)
def build_generation_request(protocol: str, payload: dict, settings: "Settings", engine: "EngineAPI",
                             prompt: Optional[str], grammar: Optional[str]) -> Optional["GenerationRequest"]:
    """Map one protocol's JSON body to a core `GenerationRequest`; return None when `protocol` is not yours.

    `payload` is the client's JSON as sent. What the calling route prepared beside it comes as arguments, never as
    keys of the payload (a client could send those): `prompt`, the rendered chat prompt that replaces the body's;
    `grammar`, a grammar the route requires (tool calls), combined with the body's structured-output fields."""


@hookspec(firstresult=True)
def format_chat_prompt(messages: list[dict], model_info: dict) -> Optional[str]:
    """Render chat messages ({"role", "content"} dicts) into a prompt; None leaves it to the model's template."""


@hookspec(firstresult=True)
def error_response(path: str, method: str, error: "ErrorInfo") -> Optional["Response"]:
    """The response for an error on `path` in your protocol's shape (status `error.status`), or None when `path` is
    not yours. `error.kind` says what went wrong (server.ERROR_KINDS); the server adds the HTTP headers."""


@hookspec
def startup(engine: "EngineAPI", settings: "Settings", app: Any) -> None:
    """Called once before serving, and before the model loads (`serve` checks every port first; the engine may
    have no model yet); may append (host, port) pairs to `app.state.extra_listeners`, or (host, port, text) where
    the text says how to change the port when it is taken."""


@hookspec
def shutdown(engine: "EngineAPI", settings: "Settings", app: Any) -> None:
    """Called once when the server exits."""
