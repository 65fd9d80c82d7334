"""Shared test fixtures. llama.cpp-made ground truth lives in ../shared/fixtures (override with AIRO_FIXTURES);
tests that need it skip with the reason shown where it is absent."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("AIRO_FIXTURES", REPO.parent / "shared" / "fixtures"))
HAVE_FIXTURES = (FIXTURES / "models").is_dir()

needs_fixtures = pytest.mark.skipif(
    not HAVE_FIXTURES, reason=f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not HAVE_FIXTURES:
        pytest.skip(f"llama.cpp fixtures not found at {FIXTURES} (set AIRO_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_index(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "reference" / "index.json").read_text())


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The demo model (airobackend.demo), written once per test session under pytest's tmp dir."""
    from airobackend.demo import demo_model_path
    return demo_model_path(tmp_path_factory.mktemp("demo"))
