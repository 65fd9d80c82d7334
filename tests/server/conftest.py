"""Fixtures for the server tests: the real engine on the demo model, and apps over it."""
from __future__ import annotations

import pytest

from fakes import demo_manager


@pytest.fixture(scope="session")
def demo_engine(demo_model):
    """The real engine on the demo model, loaded through the ModelManager as `serve` does (context 256)."""
    return demo_manager(demo_model, 256)


@pytest.fixture(scope="session")
def small_demo_engine(demo_model):
    """The same with a 64-token context, so that any request, however long it asks, ends quickly."""
    return demo_manager(demo_model, 64)


@pytest.fixture
def demo_library(tmp_path, demo_model):
    """A model folder holding the demo file under fakes.LIBRARY_MODELS' names."""
    import shutil

    from fakes import LIBRARY_MODELS

    d = tmp_path / "models"
    d.mkdir()
    for name in LIBRARY_MODELS:
        shutil.copyfile(demo_model, d / name)
    return d


@pytest.fixture
def demo_app(demo_engine):
    from fakes import make_app
    return make_app(demo_engine, n_ctx=256, multiuser=4)


@pytest.fixture(scope="session")
def real_engine(smollm2):
    """The real engine on the real model (SmolLM2-135M-Instruct, its own ChatML template), as `serve` loads it."""
    return demo_manager(str(smollm2), 512)


@pytest.fixture
def real_app(real_engine):
    from fakes import make_app
    return make_app(real_engine, n_ctx=512, multiuser=4)
