"""The plugin manager: built-in adapters and third-party plugins, registered the same way.

`get_plugin_manager()` is a factory, not an import-time global, so tests build a fresh one each time. Built-ins are
registered by dotted module name under their short name ("kobold", "textgen", "openai", "models", "llamacpp");
third-party plugins come from the entry-point group "airobackend" under their entry-point name. `--disable-adapter
NAME` blocks a plugin by either spelling before it is imported. Plugins registered later are called first (pluggy's
LIFO order), so a third-party plugin can override a built-in route or request mapping.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Iterable, Optional

import pluggy

from . import hookspecs

log = logging.getLogger("airobackend.plugins")

# Registered in reverse so that pluggy (LIFO) calls them in this order: kobold's routes win a shared path.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "airobackend.adapters.kobold",
    "airobackend.adapters.textgen",
    "airobackend.adapters.openai",
    "airobackend.adapters.models",     # model library routes (on when the engine is a ModelManager)
    "airobackend.adapters.llamacpp",   # llama.cpp server's slot save/restore
)


def short_name(dotted: str) -> str:
    """'airobackend.adapters.kobold' -> 'kobold' (the name --disable-adapter takes)."""
    return dotted.rsplit(".", 1)[-1]


def get_plugin_manager(load_entrypoints: Optional[bool] = None, blocked: Iterable[str] = (),
                       defaults: Iterable[str] = DEFAULT_PLUGINS) -> pluggy.PluginManager:
    """Build a plugin manager: hook specs, built-in adapters, then entry-point plugins, minus the `blocked` names.

    `load_entrypoints=None` loads them unless AIRO_NO_ENTRYPOINTS=1. AIRO_TRACE_PLUGINS=1 logs every hook call.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked_names = set()
    for name in blocked:
        name = name.strip()
        if name:
            blocked_names.update({name, short_name(name)})
    for name in blocked_names:
        pm.set_blocked(name)
    for dotted in reversed(tuple(defaults)):
        name = short_name(dotted)
        if pm.is_blocked(name) or pm.is_blocked(dotted):
            log.info("adapter %s disabled", name)
            continue
        pm.register(importlib.import_module(dotted), name=name)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("AIRO_NO_ENTRYPOINTS", "") not in ("1", "true", "yes")
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()
    if os.environ.get("AIRO_TRACE_PLUGINS", "") in ("1", "true", "yes"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list[str]:
    """One line per registered plugin: name, module and distribution (for `serve --list-plugins`)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    lines = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        origin = f"{dist.project_name} {dist.version}" if dist is not None else "built-in"
        lines.append(f"{name:12s} {getattr(plugin, '__name__', type(plugin).__name__)}  ({origin})")
    return lines
