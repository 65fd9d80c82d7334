"""Fixtures for the hardening tests (soak, abort/disconnect, bad model loads, security audit)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "server"):      # hardening_support, and the scripted engine of tests/server/fakes.py
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory) -> Path:
    """The demo model (tiny LLaMA GGUF, random weights) written under pytest's tmp folder."""
    from airobackend.demo import demo_model_path
    return demo_model_path(tmp_path_factory.mktemp("hardening-demo"))
