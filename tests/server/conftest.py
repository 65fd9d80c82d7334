"""Fixtures for the server tests: the real engine on the demo model, and apps over it."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_engine(tmp_path_factory):
    """The real engine on the demo model (random weights), loaded through the ModelManager as `serve` does."""
    from airobackend.demo import demo_model_path
    from airobackend.manager import ModelManager
    from airobackend.settings import Settings

    path = demo_model_path(tmp_path_factory.mktemp("demo-model"))
    settings = Settings(n_ctx=256, multiuser=4)
    manager = ModelManager(settings)
    manager.load(manager.register(str(path)))
    return manager


@pytest.fixture
def demo_app(demo_engine):
    from fakes import make_app
    return make_app(demo_engine, n_ctx=256, multiuser=4)
