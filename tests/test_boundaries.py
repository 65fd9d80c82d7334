"""The import graph keeps the project's three layers apart, read from the source with `ast` (nothing is imported).

* kernels (`kernels/`, installed as airobackend.kernels) import nothing of airobackend outside themselves;
* the core (`airobackend/`) never imports an adapter;
* adapters (`adapters/`, installed as airobackend.adapters) speak protocols, never kernels.

Every import statement counts, also those inside functions; relative imports are resolved against the module's
installed name.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# source folder -> the package it is installed as (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"airobackend": "airobackend", "kernels": "airobackend.kernels", "adapters": "airobackend.adapters"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module `source` (the text of `module`) imports; `from a import b` gives a.b, since b
    may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def layer(name: str) -> str | None:
    for prefix, what in (("airobackend.kernels", "kernels"), ("airobackend.adapters", "adapters"),
                         ("airobackend", "core")):
        if name == prefix or name.startswith(prefix + "."):
            return what
    return None


FORBIDDEN = {"kernels": {"core", "adapters"}, "core": {"adapters"}, "adapters": {"kernels"}}


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    mine = layer(module)
    return sorted(f"{module} imports {name} ({mine} -> {layer(name)})"
                  for name in imported_modules(source, module, is_package)
                  if layer(name) in FORBIDDEN.get(mine, ()))


def test_the_layers_import_only_what_they_may():
    files = [p for folder in PACKAGES for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 40 and any(p.parent.name == "kernels" for p in files)
    found = []
    for path in files:
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert found == []


def test_the_check_sees_each_kind_of_crossing():
    # kernels -> core, relative and absolute; a core module -> an adapter; an adapter -> kernels, inside a function
    assert violations("from ..errors import ModelFileError", "airobackend.kernels.matmul") == [
        "airobackend.kernels.matmul imports airobackend.errors (kernels -> core)",
        "airobackend.kernels.matmul imports airobackend.errors.ModelFileError (kernels -> core)"]
    assert violations("import airobackend.quant", "airobackend.kernels.fast")
    assert violations("from airobackend.adapters import kobold", "airobackend.server")
    assert violations("def f():\n    from airobackend.kernels import ops\n", "airobackend.adapters.openai")
    # allowed: kernels among themselves, the core on kernels, adapters on the core
    assert not violations("from . import simd\nfrom .ggml_types import GGMLType", "airobackend.kernels.fast")
    assert not violations("from .kernels.ggml_types import BLOCK", "airobackend.quant")
    assert not violations("from airobackend.server import Fields", "airobackend.adapters.kobold")
    assert not violations("from .. import JIT", "airobackend.kernels.sub", is_package=True)


def test_the_engine_and_the_model_manager_provide_what_adapters_may_ask():
    """Adapters are written against types.EngineAPI (and ModelLibrary for the model routes): both classes the
    server can hold provide every member on the class itself, not through attribute forwarding."""
    from airobackend.engine import Engine
    from airobackend.manager import ModelManager
    from airobackend.types import EngineAPI, ModelLibrary

    def members(protocol) -> set[str]:
        return {n for n in vars(protocol) if not n.startswith("_")} | set(getattr(protocol, "__annotations__", {}))

    api = members(EngineAPI)
    assert {"generate", "abort", "model_info", "embed", "save_slot"} <= api
    assert [m for m in sorted(api) if not hasattr(Engine, m)] == []
    assert [m for m in sorted(api | members(ModelLibrary)) if not hasattr(ModelManager, m)] == []
    assert not hasattr(Engine, "list_models")
