"""Fixtures of the host-integration tests: a llama.cpp fixture model, the demo model, a live `airobackend serve`."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from integration_support import FX_MODEL, Server, require_engine, serve_available


@pytest.fixture(scope="session")
def fx_model(fixtures_dir: Path) -> str:
    require_engine()
    path = fixtures_dir / "models" / FX_MODEL
    if not path.is_file():
        pytest.skip(f"llama.cpp fixture {path} missing (set AIRO_FIXTURES)")
    return str(path)


@pytest.fixture(params=["fixture", "demo"])
def model_path(request) -> str:
    """Host tests run on a llama.cpp-made fixture model and on the bundled demo model."""
    require_engine()
    return str(request.getfixturevalue("fx_model" if request.param == "fixture" else "demo_model"))


@pytest.fixture(scope="session")
def fx_server(fx_model, tmp_path_factory):
    """`airobackend serve` on a loopback port, serving the fixture model."""
    serve_available()
    server = Server(fx_model, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fx_server_with_key(fx_model, fixtures_dir, tmp_path_factory):
    """The same with `--api-key secret-key` and a model library holding a second model (fx-q8_0, GGML v3)."""
    serve_available()
    library = tmp_path_factory.mktemp("library")
    shutil.copy(fixtures_dir / "models" / "fx-q8_0.ggmlv3.bin", library / "fx-q8_0.ggmlv3.bin")
    server = Server(fx_model, tmp_path_factory.mktemp("serve-key") / "serve.log", api_key="secret-key",
                    model_dir=str(library))
    server.api_key = "secret-key"
    server.second_model = str(fixtures_dir / "models" / "fx-q8_0.ggmlv3.bin")
    yield server
    server.stop()
